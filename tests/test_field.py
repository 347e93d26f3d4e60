"""The learned field: dense + sparse feature grids, MLP heads, VolSDF beta."""

import torch

from backend.field import FeatureField, FieldConfig, FieldDecoder, grid_indices_and_weights, near_surface_voxels

SMALL = FieldConfig(channels=8, dense_resolution=8, sparse_resolution=32, hidden=16, radiance=True)


def random_points(count: int, seed: int = 0, extent: float = 1.0) -> torch.Tensor:
    return (torch.rand(count, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * extent


def test_trilinear_weights_reproduce_linear_functions():
    points = random_points(200, extent=0.8)
    indices, weights = grid_indices_and_weights(points, 16)
    assert torch.allclose(weights.sum(1), torch.ones(200))
    centres = -1.0 + (2.0 * indices.float() + 1.0) / 16  # voxel centres, as the grid is cell-centred
    assert torch.allclose((weights[..., None] * centres).sum(1), points, atol=1e-5)


def test_sample_has_valid_ranges_and_shapes():
    field = FeatureField(SMALL)
    sample = field(random_points(100))
    assert sample.sdf.shape == (100,) and sample.albedo.shape == (100, 3) and sample.radiance.shape == (100, 3)
    for values in (sample.albedo, sample.roughness, sample.metallic):
        assert ((values > 0) & (values < 1)).all()
    assert sample.offset.abs().max() == 0  # a fresh field renders its own SDF
    assert torch.allclose(field.sdf(random_points(100)), sample.sdf)
    assert abs(field.beta.item() - SMALL.beta_init) < 1e-6
    assert FieldDecoder(SMALL)(torch.randn(5, SMALL.channels)).sdf.shape == (5,)


def test_activating_the_sparse_grid_keeps_the_field_and_stays_local():
    field = FeatureField(SMALL)
    with torch.no_grad():  # make the surface a sphere-like shape: sdf rises with the distance from the centre
        field.decoder.geometry.bias[0] = -0.3
    voxels = torch.cartesian_prod(*(torch.arange(8, 20),) * 3)
    field.set_sparse(voxels)
    assert field.sparse_count == len(voxels)  # features stored for active voxels only
    assert field.sparse_features.shape == (len(voxels), SMALL.channels)
    points = random_points(500, seed=1)
    mask = field.sparse_mask(points)
    # Inside the active block the sparse grid answers alone; far from it the dense grid does.
    inside = torch.tensor([[-0.2, -0.2, -0.2]])
    outside = torch.tensor([[0.9, 0.9, 0.9]])
    assert field.sparse_mask(inside).item() == 1.0 and field.sparse_mask(outside).item() == 0.0
    assert ((mask > 0) & (mask < 1)).any()  # a blended boundary exists
    # Sparse features start from the field itself: reading them back changes little (the dense grid is
    # coarser, so values at fine voxel centres are exact and in between they are re-interpolated).
    centres = -1.0 + (2.0 * voxels[:50].float() + 1.0) / SMALL.sparse_resolution
    assert torch.allclose(field.features(centres), field.dense_features(centres), atol=1e-5)

    # Editing sparse features changes only points near active voxels.
    with torch.no_grad():
        field.sparse_features.add_(1.0)
    far = random_points(100, seed=2, extent=0.2) + 0.75
    before = field.dense_features(far)
    assert torch.allclose(field.features(far), before)


def test_dense_sparse_blend_is_continuous():
    field = FeatureField(SMALL)
    field.set_sparse(torch.cartesian_prod(*(torch.arange(10, 16),) * 3))
    with torch.no_grad():
        field.sparse_features.normal_()  # sparse values now differ from the dense ones
    # Walk across the boundary of the active block in tiny steps: no jumps, only slopes.
    t = torch.linspace(-0.6, 0.2, 4001)[:, None]
    line = torch.cat([t, torch.full_like(t, -0.25), torch.full_like(t, -0.22)], dim=-1)
    features = field.features(line)
    step = (features[1:] - features[:-1]).abs().max()
    assert step < 0.02, step
    mask = field.sparse_mask(line)
    assert mask[0] == 0 and mask.max() == 1 and (mask[1:] - mask[:-1]).abs().max() < 0.02


def test_near_surface_voxels_finds_a_shell():
    radius = 0.5
    voxels = near_surface_voxels(lambda p: p.norm(dim=-1) - radius, resolution=64, band=0.05)
    centres = -1.0 + (2.0 * voxels.float() + 1.0) / 64
    distance = (centres.norm(dim=-1) - radius).abs()
    assert (distance < 0.05).all()
    shell_volume = 4 / 3 * torch.pi * ((radius + 0.05) ** 3 - (radius - 0.05) ** 3)
    assert abs(len(voxels) / (shell_volume / (2 / 64) ** 3) - 1) < 0.1  # nothing missed by the block pass


def test_activate_near_surface_and_checkpoint_round_trip():
    field = FeatureField(SMALL)
    with torch.no_grad():
        field.decoder.geometry.weight.zero_()
        field.decoder.geometry.bias[0] = 0.5  # sdf 0.5 everywhere: no surface, no voxel qualifies
    assert field.activate_near_surface() == 0
    field.set_sparse(torch.tensor([[3, 4, 5], [1, 2, 3], [3, 4, 5]]))  # duplicates collapse
    assert field.sparse_count == 2 and (field.sparse_keys.diff() > 0).all()
    # Now with fine voxels to blend and no surface within a block's reach of any block centre: no voxel is tested
    # (`both` on the barrel, whose coarse stage lost the surface).
    with torch.no_grad():
        field.decoder.geometry.bias[0] = 0.9
    assert field.activate_near_surface() == 0 and field.sparse_count == 0
    with torch.no_grad():
        field.decoder.geometry.bias[0] = 0.5
    field.set_sparse(torch.tensor([[3, 4, 5], [1, 2, 3], [3, 4, 5]]))
    restored = FeatureField(SMALL)
    restored.load_state_dict(field.state_dict())
    points = random_points(50, seed=3)
    assert torch.equal(restored(points).sdf, field(points).sdf)


def test_gradients_reach_grids_heads_and_beta_including_second_order():
    field = FeatureField(SMALL)
    field.set_sparse(torch.cartesian_prod(*(torch.arange(12, 20),) * 3))
    points = random_points(300, seed=4, extent=0.3).requires_grad_(True)
    sdf = field.sdf(points)
    (normals,) = torch.autograd.grad(sdf.sum(), points, create_graph=True)
    eikonal = ((normals.norm(dim=-1) - 1) ** 2).mean()
    sample = field(points.detach())
    heads = sample.sdf.mean() + sample.offset.mean() + sample.albedo.mean() + sample.radiance.mean()
    (eikonal + heads + sample.roughness.mean() + sample.metallic.mean() + field.beta).backward()
    for name, parameter in field.named_parameters():
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_split_decoder_keeps_shape_and_materials_on_their_own_channels():
    config = FieldConfig(channels=8, dense_resolution=8, sparse_resolution=16, hidden=16, geometry_channels=3)
    decoder = FieldDecoder(config)
    features = torch.randn(20, 8)
    changed = features.clone()
    changed[:, 3:] += 1.0  # appearance channels only
    before, after = decoder(features), decoder(changed)
    assert torch.equal(before.sdf, after.sdf) and torch.equal(before.sdf, decoder.sdf(features))
    assert not torch.allclose(before.albedo, after.albedo)
    changed = features.clone()
    changed[:, :3] += 1.0  # geometry channels only
    assert torch.equal(decoder(changed).albedo, before.albedo) and not torch.equal(decoder(changed).sdf, before.sdf)
    assert FeatureField(config)(random_points(10)).sdf.shape == (10,)

"""The LSRM transformer: tokens, stages, the sparse/dense blend, gradients, checkpoints, Engine A."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from backend.data.synthetic import sample_scene
from backend.errors import InputError
from backend.field import read_blended, read_dense, voxel_centres
from backend.model.attention import Attention
from backend.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from backend.model.config import CONFIGS, ModelConfig
from backend.model.lsrm import LSRM, Views, _fine_voxels, count_parameters, unpatchify
from backend.model.tokens import VolumeEmbedding, patchify
from tests.fields import UniformSphere

TINY = CONFIGS["tiny"]


def tiny_views(seed: int = 3, views: int = 4, size: int = 64) -> Views:
    scene = sample_scene(seed, views, size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(1, views, size, size, 3, generator=generator)
    masks = (torch.rand(1, views, size, size, generator=generator) > 0.3).float()
    background = torch.rand(1, views, size, size, 3, generator=generator)
    return Views(images, masks, [scene.canonical_cameras], background)


def test_patchify_keeps_pixels_in_row_major_patches() -> None:
    image = torch.arange(4 * 6 * 2, dtype=torch.float32).reshape(4, 6, 2)
    patches = patchify(image, 2)
    assert patches.shape == (2, 3, 8)
    assert torch.equal(patches[1, 2].reshape(2, 2, 2), image[2:4, 4:6])


def test_volume_embedding_is_a_sum_of_axis_tables_and_resamples_consistently() -> None:
    embedding = VolumeEmbedding(8, 4)
    voxels = torch.cartesian_prod(*(torch.arange(4),) * 3)
    assert torch.allclose(embedding.at(voxels, 4), embedding.grid())
    x, y, z = embedding.axes
    assert torch.allclose(embedding.grid()[(1 * 4 + 2) * 4 + 3], x[1] + y[2] + z[3])
    fine = embedding.resampled(8)
    assert fine.shape == (3, 8, 8)
    # cell centres 1.5/8*4-0.5 = 0.25 between rows 0 and 1 of the coarse table
    assert torch.allclose(fine[0, 1], 0.75 * x[0] + 0.25 * x[1], atol=1e-6)


def test_unpatchify_and_fine_voxels_agree_on_where_each_feature_goes() -> None:
    r, u, c = 3, 2, 5
    tokens = torch.randn(1, r**3, u**3 * c)
    volume = unpatchify(tokens, r, u, c)[0]  # [C, 6, 6, 6]
    voxels = torch.cartesian_prod(*(torch.arange(r),) * 3)  # x-major, as the tokens
    fine, features = _fine_voxels(voxels, tokens[0], u, c)
    x, y, z = fine.unbind(-1)
    assert torch.equal(volume[:, x, y, z].T, features)


def test_sparse_features_blend_continuously_across_the_mask_boundary() -> None:
    torch.manual_seed(0)
    dense = torch.randn(4, 8, 8, 8)
    resolution = 16
    voxels = torch.cartesian_prod(torch.arange(4, 9), torch.arange(16), torch.arange(16))  # a slab in x
    keys = (voxels[:, 0] * resolution + voxels[:, 1]) * resolution + voxels[:, 2]
    features = torch.randn(len(voxels), 4)
    line = torch.stack([torch.linspace(-1, 1, 4001), torch.full((4001,), 0.1), torch.full((4001,), -0.2)], -1)
    values = read_blended(dense, keys, features, resolution, line)
    steps = values.diff(dim=0).abs().amax()
    # Lipschitz along the line: a jump at the boundary would be O(1), linear pieces give O(step).
    assert steps < 0.05, f"largest jump {steps:.3f} between points 0.0005 apart"
    inside = voxel_centres(voxels[:5], resolution)
    assert torch.allclose(read_blended(dense, keys, features, resolution, inside), features[:5], atol=1e-5)
    far = torch.tensor([[0.9, 0.9, 0.9]])
    assert torch.allclose(read_blended(dense, keys, features, resolution, far), read_dense(dense, far))


def test_stage_two_starts_as_stage_one_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = LSRM(TINY)
    views = tiny_views()
    guide = [UniformSphere(0.5)]
    prediction = model(views, stages=2, guide=guide)
    assert prediction.counts["volume tokens"] > 0 and prediction.counts["image tokens"] > 0
    sparse, dense = prediction.fields[0], prediction.dense_fields[0]
    assert len(sparse.sparse_keys) > 0
    # Zero residual at start: the sparse voxels hold the dense features at their centres.
    centres = voxel_centres(torch.tensor([[20, 16, 16], [16, 26, 16]]), TINY.field.sparse_resolution)
    assert torch.allclose(sparse.features(centres), dense.features(centres), atol=1e-5)

    # Zero-initialised output layers (the residual, the compression MLPs) pass gradients on from the third step.
    points = torch.rand(512, 3) * 1.2 - 0.6
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        prediction = model(views, stages=2, guide=guide)
        field = prediction.fields[0]
        sample = field(points)
        loss = sample.sdf.square().mean() + sample.albedo.mean() + sample.roughness.mean() + sample.metallic.mean()
        loss = loss + (sample.offset.square().mean() + field.beta) + prediction.dense_fields[0].sdf(points).mean()
        loss.backward()
        optimiser.step()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The image-encoder layer exists only with encoder_channels > 0, so nothing may be missing.
    assert not missing, f"no gradient reaches {missing}"


def test_stage_two_is_skipped_without_any_surface() -> None:
    model = LSRM(TINY)
    prediction = model(tiny_views(), stages=2, guide=[UniformSphere(5.0)])  # surface outside the box
    assert prediction.counts["volume tokens"] == 0
    assert prediction.fields[0] is prediction.dense_fields[0]


def test_routing_switch_runs_both_ways() -> None:
    torch.manual_seed(1)
    views = tiny_views()
    for routing in ("3d", "score"):
        model = LSRM(dataclasses.replace(TINY, routing=routing))
        prediction = model(views, guide=[UniformSphere(0.5)])
        assert torch.isfinite(prediction.fields[0].sparse_features).all()


def test_small_config_fits_the_shipping_limit() -> None:
    model = LSRM(CONFIGS["small"])
    megabytes = count_parameters(model) * 2 / 1e6
    assert megabytes <= 48.0, f"small is {megabytes:.1f} MB in bf16"


def test_config_round_trips_and_rejects_nonsense() -> None:
    config = CONFIGS["paper"]
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="kv_heads"):
        ModelConfig(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_json(json.dumps({"hidden": 64, "wings": 2}))


def test_checkpoint_round_trip_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(2)
    model = LSRM(TINY).eval()
    views = tiny_views()
    guide = [UniformSphere(0.5)]
    path = save_checkpoint(model, tmp_path / "tiny.safetensors", notes={"trained": "no"})
    loaded = load_checkpoint(path)
    points = torch.rand(256, 3) * 2 - 1
    with torch.no_grad():
        a = model(views, guide=guide).fields[0](points)
        b = loaded(views, guide=guide).fields[0](points)
    assert torch.equal(a.sdf, b.sdf) and torch.equal(a.albedo, b.albedo)
    assert loaded.config == model.config


def test_bf16_checkpoint_is_stable_after_the_first_rounding(tmp_path) -> None:
    model = LSRM(TINY)
    once = load_checkpoint(save_checkpoint(model, tmp_path / "a.safetensors", dtype=torch.bfloat16))
    twice = load_checkpoint(save_checkpoint(once, tmp_path / "b.safetensors", dtype=torch.bfloat16))
    for (name, a), (_, b) in zip(once.state_dict().items(), twice.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
        ("foreign", "not an LSRM checkpoint"),
        ("shape", "has shape"),
        ("missing", "missing"),
        ("nan", "non-finite"),
        ("absent", "does not exist"),
    ],
)
def test_bad_checkpoints_say_what_is_wrong(tmp_path, damage: str, message: str) -> None:
    model = LSRM(TINY)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "lsrm-checkpoint", "version": "1", "config": TINY.to_json()}
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "foreign":
        save_file({"weight": torch.zeros(2)}, str(path))
    elif damage == "shape":
        state["decoder.geometry.weight"] = torch.zeros(3, 3)
        save_file(state, str(path), metadata=metadata)
    elif damage == "missing":
        del state["decoder.geometry.weight"]
        save_file(state, str(path), metadata=metadata)
    elif damage == "nan":
        state["log_beta"] = torch.tensor(float("nan"))
        save_file(state, str(path), metadata=metadata)
    elif damage == "absent":
        path.unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_feedforward_engine_without_a_checkpoint_says_so(tmp_path) -> None:
    from backend.reconstruct import reconstruct

    with pytest.raises(InputError, match="needs a trained checkpoint"):
        reconstruct(tmp_path / "no-bundle", tmp_path / "out.glb", preset="cpu", engine="feedforward")
    assert not (tmp_path / "out.glb").exists()


@pytest.mark.slow
def test_tiny_model_overfits_one_object(tmp_path) -> None:
    """Stage 1 of `tiny` learns one synthetic object from its views and its known SDF: the image loss
    (colour + mask) falls at least 2x in 250 CPU steps (measured 2.6-3.1x)."""
    from backend.bundle import canonical_normalisation, load_bundle
    from backend.data.synthetic import write_synthetic_bundle
    from backend.model.losses import LossConfig, view_loss
    from backend.shading import Environment

    bundle = load_bundle(write_synthetic_bundle(7, 8, 64, None, tmp_path / "bundle"))
    cameras = canonical_normalisation(bundle).cameras_to_canonical(bundle.cameras)  # the frame reconstruct uses
    spec = bundle.environment
    environment = Environment.load(spec.path, spec.rotation_z, spec.strength)
    views = Views(bundle.images[None], bundle.masks[None], [cameras])
    truth = sample_scene(7, 8, 64).object  # the bundle's aabb makes its canonical frame the scene's

    torch.manual_seed(0)
    model = LSRM(dataclasses.replace(TINY, background=False))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    config = LossConfig(rays=256, sdf=1.0)
    losses = []
    for _ in range(250):
        field = model(views, stages=1).fields[0]
        terms = view_loss(field, cameras, bundle.images, bundle.masks, environment, config, generator, truth=truth)
        optimiser.zero_grad()
        terms["total"].backward()
        optimiser.step()
        losses.append(float((terms["colour"] + terms["mask"]).detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"tiny overfit: colour+mask loss {first:.4f} -> {last:.4f} ({first / last:.1f}x)")
    assert last < first / 2


def test_engine_a_runs_a_checkpoint_through_reconstruct(tmp_path) -> None:
    """The feed-forward path end to end: checkpoint -> load -> predict (both stages) -> export -> GLB.

    No trained checkpoint exists yet, so a random `tiny` model stands in, its SDF head shifted so that
    its field crosses zero inside the box (a random blob, but a surface to mesh and bake).
    """
    from backend.data.synthetic import write_synthetic_bundle
    from backend.reconstruct import reconstruct

    bundle_dir = write_synthetic_bundle(7, 6, 48, None, tmp_path / "bundle")
    torch.manual_seed(0)
    model = LSRM(TINY)
    views = tiny_views()
    with torch.no_grad():
        sdf = model(views, stages=1).fields[0].sdf(torch.rand(4096, 3) * 1.6 - 0.8)
        model.decoder.geometry.bias[0] -= sdf.median()
    checkpoint = save_checkpoint(model, tmp_path / "tiny.safetensors")
    result = reconstruct(
        bundle_dir, tmp_path / "ff.glb", preset="cpu", engine="feedforward", checkpoint=checkpoint, device="cpu"
    )
    assert result.path.stat().st_size > 1_000 and result.export_stats
    assert result.training_psnr is None and result.engine == "feedforward"
    assert "feed-forward" in result.timings


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_attention_equals_attention_with_repeated_key_heads(kv_heads: int) -> None:
    torch.manual_seed(0)
    attention = Attention(hidden=32, heads=8, kv_heads=kv_heads, head_dim=8)
    x_q, x_kv = torch.randn(2, 13, 32), torch.randn(2, 7, 32)
    q, k, v = attention.project(x_q, x_kv)  # [B, N, H, D]
    group = 8 // kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(-2)
    torch.testing.assert_close(attention(x_q, x_kv), attention.out(expected), rtol=1e-5, atol=1e-6)


def test_forward_sections_are_timed_and_profiled() -> None:
    from bench.model_forward import profile_forward

    model = LSRM(CONFIGS["tiny"]).eval()
    views = tiny_views(views=2)
    with torch.no_grad():
        report = profile_forward(lambda: model(views, stages=1), torch.device("cpu"), top=5)
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == ["tokenise", "stage 1", "dense volume"]
    assert all(s["calls"] == 1 and s["seconds"] > 0 and s["depth"] == 0 for s in sections.values())
    assert len(report["top_ops"]) == 5 and report["top_ops_by"] == "self CPU"
    assert all(op["op"] and op["calls"] >= 1 and op["self_cpu_ms"] >= 0 for op in report["top_ops"])
    assert report["top_ops"][0]["self_cpu_ms"] >= report["top_ops"][-1]["self_cpu_ms"] > 0

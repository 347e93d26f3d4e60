"""The backend's HTTP API as the add-on speaks it (stdlib urllib only; no bpy, so it runs in worker threads).

Every failure becomes a `BackendError` holding one sentence for the user: the service unreachable,
the token refused, a request refused (the service's own one-sentence `detail`), a job that failed,
a result that is missing. `run_job` is the whole client side of one reconstruction: zip the bundle,
submit it, poll until it finishes (reporting stage and progress), download the GLB.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

API = "/v1"
POLL_SECONDS = 0.5
FINISHED = ("done", "failed", "cancelled")
# The service names the asset after the zip's file name, and accepts only these characters in it.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class BackendError(Exception):
    """One sentence for the user: what went wrong with the backend and what to do about it."""


@dataclass(frozen=True)
class Connection:
    url: str  # e.g. http://127.0.0.1:8765, no trailing slash
    token: str
    timeout: float = 30.0


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (the only place the add-on may reach without online access)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalised_url(url: str) -> str:
    """The service's base URL, checked: http(s)://host[:port] without a trailing slash."""
    url = url.strip().rstrip("/")
    if url.endswith(API):
        url = url[: -len(API)]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"'{url}' is not a backend URL; give one like http://127.0.0.1:8765.")
    return url


def health(connection: Connection) -> dict:
    """The service's health report (version, device, GPU, model, presets); needs no token."""
    return _json(_request(connection, "GET", "/health"))


def check_token(connection: Connection) -> None:
    """Raise BackendError when the service refuses the token.

    The API has no route that only checks a token, so ask for a job that cannot exist: a 404 means the
    token was accepted (the guard answers 401 before it looks for the job).
    """
    try:
        _request(connection, "GET", "/jobs/token-check")
    except _NotFoundError:
        return


def submit(connection: Connection, archive: Path, fields: dict[str, str]) -> str:
    """Upload a zipped bundle with the job's form fields; returns the job id."""
    boundary = uuid.uuid4().hex
    parts = [_form_field(boundary, name, value) for name, value in fields.items()]
    header = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; filename="{archive.name}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    )
    body = b"".join(parts) + header.encode() + archive.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    kind = f"multipart/form-data; boundary={boundary}"
    return _json(_request(connection, "POST", "/jobs", body, kind))["id"]


def job_status(connection: Connection, job_id: str) -> dict:
    return _json(_request(connection, "GET", f"/jobs/{job_id}"))


def cancel(connection: Connection, job_id: str) -> dict:
    return _json(_request(connection, "DELETE", f"/jobs/{job_id}"))


def download_result(connection: Connection, job_id: str, target: Path) -> Path:
    """The job's GLB written to `target` (whole or not at all)."""
    try:
        data = _request(connection, "GET", f"/jobs/{job_id}/result")
    except _NotFoundError as missing:
        raise BackendError(f"the result of job {job_id} is missing ({missing}); reconstruct again.") from None
    if data[:4] != b"glTF":
        raise BackendError(f"the result of job {job_id} is not a GLB file; reconstruct again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def zip_bundle(folder: Path, archive: Path) -> Path:
    """The bundle folder zipped (its files at the top), for upload."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    return archive


def safe_name(name: str) -> str:
    """A name the service keeps as the asset's name: letters, digits, '_', '.', '-' (at most 64)."""
    return _UNSAFE.sub("_", name).strip("._")[:64] or "object"


Progress = Callable[[str, float, str], None]  # stage, fraction 0..1, message


def run_job(
    connection: Connection,
    bundle: Path,
    name: str,
    fields: dict[str, str],
    result: Path,
    progress: Progress,
    should_stop: Callable[[], bool] = lambda: False,
) -> Path | None:
    """One reconstruction from the client's side; returns the downloaded GLB, or None when cancelled.

    `should_stop` is asked between polls; when it says so the job is cancelled on the service, and
    this returns once the service has stopped it.
    """
    progress("upload", 0.0, "sending the views")
    archive = zip_bundle(bundle, result.parent / f"{safe_name(name)}.zip")
    try:
        job_id = submit(connection, archive, fields)
    finally:
        archive.unlink(missing_ok=True)
    cancelling = False
    while True:
        if should_stop() and not cancelling:
            cancel(connection, job_id)  # the job stops at its engine's next step; wait for that
            cancelling = True
        status = job_status(connection, job_id)
        if status["state"] in FINISHED:
            break
        progress(status["stage"], status["progress"], status["message"])
        time.sleep(POLL_SECONDS)
    if cancelling or status["state"] == "cancelled":
        return None
    if status["state"] == "failed":
        raise BackendError(f"the reconstruction failed: {status['message'].rstrip('.')}.")
    progress("download", 1.0, "fetching the result")
    return download_result(connection, job_id, result)


# ---------------------------------------------------------------------------------------------


class _NotFoundError(BackendError):
    """A 404 from the service; callers that expect one catch it."""


def _form_field(boundary: str, name: str, value: str) -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def _request(connection: Connection, method: str, path: str, body: bytes | None = None, kind: str = "") -> bytes:
    headers = {"Authorization": f"Bearer {connection.token}"}
    if kind:
        headers["Content-Type"] = kind
    request = urllib.request.Request(connection.url + API + path, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=connection.timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        detail = _detail(error)
        if error.code == 401:
            raise BackendError(
                f"the backend at {connection.url} refused the token; copy the contents of its token file into the "
                "add-on's preferences."
            ) from None
        if error.code == 404:
            raise _NotFoundError(detail) from None
        raise BackendError(f"the backend refused the request: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, socket.timeout | TimeoutError):
            reason = f"no answer within {connection.timeout:g} s"
        raise BackendError(
            f"cannot reach the backend at {connection.url} ({reason}); start it, or check the URL in the preferences."
        ) from None


def _detail(error: urllib.error.HTTPError) -> str:
    """The service's one-sentence `detail`, or the HTTP reason when the answer is not the service's JSON."""
    try:
        detail = json.loads(error.read())["detail"]
    except (ValueError, KeyError, TypeError, OSError):
        detail = f"HTTP {error.code} {error.reason}"
    return str(detail).rstrip(".") + "."


def _json(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        raise BackendError("the backend answered with something that is not JSON; is the URL a backend?") from None

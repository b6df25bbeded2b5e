"""The CPU image, built for real with podman from the Dockerfile and run: `selfreward --help` and two stages
of a tiny-model recipe, as its non-root user, with no network.

No image registry is reachable here, so the base (python:3.11-slim upstream) is a minimal Debian bookworm
with python3 made by debootstrap; pip inside the build gets this machine's pip settings and wheel folders
(read-only mounts), as a build behind a proxy or an offline mirror would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, build_tiny_model, needs
from tests.test_pipeline import tiny_recipe

pytestmark = pytest.mark.slow
BASE = "localhost/selfreward-test-base:bookworm"
IMAGE = "localhost/selfreward:cpu-test"
# The image holds 2.2 GB; while podman commits the install layer it holds it about three times over (the
# container's files, the layer's tar, the layer unpacked). A machine with less free space than this skips
# the test, saying so, even under CI: disk space is a resource of the machine, like a GPU, not an install.
NEEDED_GIB = 8
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--network=none", "--pull=never",
       "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _missing() -> str | None:
    absent = [name for name in ("podman", "runc", "debootstrap") if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed: apt-get install podman runc debootstrap (CI does)"
    if os.geteuid() != 0:
        return "building with podman --isolation chroot here needs root"
    return None


def _pip_settings() -> dict[str, str]:
    """This machine's effective pip settings (files and environment), e.g. {"find-links": "/opt/wheels"}."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip("'\"")
    return settings


def _pip_mounts(folder: Path) -> list[str]:
    """A pip.conf holding this machine's pip settings, mounted read-only at /etc/pip.conf for the build, and
    read-only mounts of the folders it names (wheel folders, local indexes, constraints, the trust store), so
    that pip inside the build resolves as pip outside it does. Nothing of it stays in the image."""
    settings = {k: v for k, v in _pip_settings().items() if k in ("find-links", "extra-index-url", "index-url", "constraint", "cert")}
    conf = folder / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    paths = {"/etc/ssl/certs"}
    for key, value in settings.items():
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                # A local index's pages link to files beside it (.../simple → ../files): mount its parent.
                paths.add(str(Path(path).parent) if key.endswith("index-url") or not Path(path).is_dir() else path)
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    return mounts + [arg for path in sorted(paths) for arg in ("-v", f"{path}:{path}:ro")]


def _free_gib() -> tuple[float, str]:
    """Free space where podman keeps its images (its graph root, or the nearest folder above that exists)."""
    root = subprocess.run(["podman", "info", "--format", "{{.Store.GraphRoot}}"], capture_output=True, text=True).stdout.strip()
    path = Path(root or "/var/lib/containers")
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 2**30, str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    reason = _missing()
    needs(reason is None, str(reason))
    free, where = _free_gib()
    if free < NEEDED_GIB:
        pytest.skip(f"building the image needs {NEEDED_GIB} GiB free on {where}; this machine has {free:.1f} GiB")
    if subprocess.run(["podman", "image", "exists", BASE]).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,passwd", "bookworm",
                        str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
    # The CPU torch: from this machine's local index where it has one (download.pytorch.org is not reachable).
    local = [url for url in _pip_settings().get("extra-index-url", "").split() if url.startswith("file://")]
    torch_index = local[0] if local else "https://download.pytorch.org/whl/cpu"
    build = subprocess.run(
        ["podman", "build", "--isolation", "chroot", "--pull=never", *_pip_mounts(tmp_path_factory.mktemp("pip")),
         "--build-arg", f"CPU_BASE={BASE}", "--build-arg", f"TORCH_INDEX={torch_index}",
         "--target", "cpu", "-t", IMAGE, "-f", str(ROOT / "Dockerfile"), str(ROOT)],
        capture_output=True, text=True,
    )
    try:
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        yield IMAGE
    finally:  # the image and its build layers would hold 2 GB of this machine's disk for nothing
        subprocess.run(["podman", "rmi", "--force", IMAGE], capture_output=True)
        subprocess.run(["podman", "image", "prune", "--force"], capture_output=True)


def test_the_cpu_image_runs_the_cli_and_tiny_model_stages_as_a_non_root_user(image, tmp_path):
    data = tmp_path / "data"
    build_tiny_model(data / "model")
    (data / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe("/data/model", iterations=1, sft={"enabled": False})))
    os.chmod(data, 0o777)
    for path in data.rglob("*"):
        os.chmod(path, 0o777 if path.is_dir() else 0o666)
    run = [*RUN, "-v", f"{data}:/data", image]
    help_text = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage: selfreward" in help_text and "iterate" in help_text
    for stage in (["prompts"], ["generate", "--shard", "1/2"]):
        done = subprocess.run([*run, stage[0], "--recipe", "/data/recipe.yaml", "--output", "/data/run", "--iteration", "1",
                               *stage[1:]], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    iteration = data / "run" / "iter1"
    assert len((iteration / "prompts.jsonl").read_text().splitlines()) == 6
    assert len((iteration / "responses.part-1-of-2.jsonl").read_text().splitlines()) == 2 * 3  # shard 1 of 2: the first of 3 units, 2 prompts x n=3
    assert (iteration / "prompts.jsonl").stat().st_uid == 1000  # written by the image's user, not root

"""SIGKILL `curate ingest` / `curate shards` at several points, rerun, compare with a clean run."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.synth import encode, make_image

pytestmark = pytest.mark.slow


def _files(d: Path) -> dict[str, bytes]:
    """Every file under d except manifests and markers that hold timestamps."""
    skip = {"_MANIFEST.json", "_STARTED.json"}
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name not in skip}


def _curate(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL proc after `seconds` unless it ended first; True when it was killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _kill_when(proc: subprocess.Popen, reached, poll: float = 0.005) -> bool:
    """SIGKILL proc once `reached()` is true (a point in its progress, not in wall time, so the kill
    lands mid-run whatever the machine's load); True when it was killed before it ended."""
    while proc.poll() is None:
        if reached():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(poll)
    return False


@pytest.fixture(scope="module")
def raw_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    folder = root / "folder"
    folder.mkdir()
    for i in range(600):
        (folder / f"{i:04d}.jpg").write_bytes(encode(make_image(1000 + i, (96, 96)), "JPEG", quality=85))
    (folder / "junk.jpg").write_bytes(b"nope")
    return root


def test_sigkill_during_ingest_then_rerun_gives_identical_output(raw_inputs, image_server, cli_env, tmp_path):
    for i in range(120):
        image_server.add(f"/u/{i}.png", encode(make_image(5000 + i, (80, 80)), "PNG"), content_type="image/png")
    urls = [image_server.url(f"/u/{i}.png") for i in range(120)] + [image_server.url("/404")]
    (raw_inputs / "urls.txt").write_text("\n".join(urls) + "\n")
    sources = [str(raw_inputs / "folder"), str(raw_inputs / "urls.txt")]
    common = ["--part-size", "25", "--workers", "2", "--concurrency", "4"]

    ref = tmp_path / "ref"
    t0 = time.time()
    proc = _curate(["ingest", *sources, "--workdir", str(ref), *common], cli_env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    full = time.time() - t0
    reference = _files(ref / "ingest")
    assert sum(1 for k in reference if k.startswith("part-")) == 29  # 722 inputs / 25

    rng = random.Random(7)
    for point in (0.25, 0.5, 0.75):
        for retry in range(4):  # a run quicker than the reference can end before a late point: retry earlier
            image_server.reset_counts()
            work = tmp_path / f"killed{point}-{retry}"
            killed = 0
            for _ in range(2):  # kill twice at jittered points, then finish
                delay = full * point * rng.uniform(0.8, 1.2) / 2**retry
                killed += _kill_after(_curate(["ingest", *sources, "--workdir", str(work), *common], cli_env), delay)
            if killed:
                break
        proc = _curate(["ingest", *sources, "--workdir", str(work), *common], cli_env)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
        assert killed >= 1
        assert _files(work / "ingest") == reference
        # a download lands in the part's cache as it finishes, so a kill can only cost the URLs a
        # worker had pulled ahead and not yet cached: 2 x concurrency per worker, once per kill
        fetched_again = {p: n for p, n in image_server.ok_hits.items() if n > 1}
        assert len(fetched_again) <= killed * 2 * (2 * 4), f"finished downloads fetched again: {fetched_again}"
        assert all(n <= 1 + killed for n in fetched_again.values()), fetched_again

    # a finished run does nothing more and says so
    proc = _curate(["ingest", *sources, "--workdir", str(ref), *common], cli_env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"already done" in out


def test_sigkill_during_shards_then_rerun_gives_identical_shards(raw_inputs, cli_env, tmp_path):
    src = str(raw_inputs / "folder")
    work = tmp_path / "w"
    for cmd in (["ingest", src, "--part-size", "200"], ["hashdedup"]):
        proc = _curate([*cmd, "--workdir", str(work)], cli_env)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    ref_out = tmp_path / "ref"
    proc = _curate(["shards", "--workdir", str(work), "--out", str(ref_out), "--max-count", "4"], cli_env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    reference = _files(ref_out)
    assert len([k for k in reference if k.endswith(".tar")]) == 150
    kills = 0
    for point in (0.5, 0.7, 0.85):  # killed once this fraction of the 150 shards is on disk
        out = tmp_path / f"out{point}"
        killed = _kill_when(_curate(["shards", "--workdir", str(work), "--out", str(out), "--max-count", "4"], cli_env),
                            lambda: out.is_dir() and sum(1 for _ in out.glob("*.tar")) >= 150 * point)
        proc = _curate(["shards", "--workdir", str(work), "--out", str(out), "--max-count", "4"], cli_env)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
        assert _files(out) == reference, f"killed={killed}"
        kills += killed
    assert kills >= 2
    proc = _curate(["shards", "--verify", str(out)], cli_env)
    assert proc.wait(timeout=120) == 0

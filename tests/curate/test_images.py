import io

import imagehash
from PIL import Image, ImageOps

from curate.images import CheckSettings, check_image, sha256_hex
from tests.badfiles import corpus


def test_every_awkward_file_gets_its_status():
    got = {name: check_image(data).status for name, (data, _) in corpus().items()}
    want = {name: status for name, (_, status) in corpus().items()}
    assert got == want


def test_ok_images_have_size_format_and_phash():
    files = corpus()
    for name, (data, status) in files.items():
        res = check_image(data)
        assert res.sha256 == sha256_hex(data) and res.nbytes == len(data)
        if status == "ok":
            assert res.width and res.height and res.ext and res.phash is not None, name
            assert 0 <= res.phash < 2**64


def test_exif_orientation_swaps_reported_size():
    res = check_image(corpus()["rotated.jpg"][0])
    assert (res.width, res.height) == (60, 120)


def test_modes_and_frames_are_recorded():
    files = corpus()
    assert check_image(files["cmyk.jpg"][0]).mode == "CMYK"
    assert check_image(files["sixteen.png"][0]).mode.startswith("I")
    gif = check_image(files["animated.gif"][0])
    assert gif.n_frames == 3 and gif.ext == "gif"


def test_limits_are_settings():
    data = corpus()["good.jpg"][0]
    assert check_image(data, CheckSettings(min_side=100)).status == "too_small"
    assert check_image(data, CheckSettings(max_pixels=1000)).status == "too_many_pixels"
    assert check_image(data, CheckSettings(max_bytes=10)).status == "too_large"


def _big_rotated_jpeg(size: tuple[int, int] = (640, 300), orientation: int = 6) -> bytes:
    from pipelines.synth import make_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    make_image(7, size).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_fast_mode_records_true_size_and_exact_limits():
    data = _big_rotated_jpeg()  # large enough for a 1/4 draft decode
    fast, exact = check_image(data), check_image(data, CheckSettings(phash_exact=True))
    assert (fast.width, fast.height) == (exact.width, exact.height) == (300, 640)
    assert (fast.status, fast.format, fast.mode, fast.sha256) == (exact.status, exact.format, exact.mode, exact.sha256)
    assert check_image(data, CheckSettings(min_side=300)).status == "ok"
    assert check_image(data, CheckSettings(min_side=301)).status == "too_small"
    assert check_image(data, CheckSettings(max_pixels=640 * 300)).status == "ok"
    assert check_image(data, CheckSettings(max_pixels=640 * 300 - 1)).status == "too_many_pixels"
    assert bin(fast.phash ^ exact.phash).count("1") <= 8


def test_fast_mode_still_finds_truncated_and_corrupt_jpegs():
    data = _big_rotated_jpeg(orientation=1)
    cut = check_image(data[: len(data) // 2])
    assert cut.status == "truncated" and cut.width is None
    damaged = bytearray(data)
    damaged[len(data) // 2: len(data) // 2 + 64] = b"\xff\xd9" * 32  # end-of-image markers mid-scan
    assert check_image(bytes(damaged)).status == check_image(bytes(damaged), CheckSettings(phash_exact=True)).status


def test_exact_mode_phash_is_imagehash():
    data = _big_rotated_jpeg()
    with Image.open(io.BytesIO(data)) as img:
        want = str(imagehash.phash(ImageOps.exif_transpose(img).convert("RGB")))
    assert f"{check_image(data, CheckSettings(phash_exact=True)).phash:016x}" == want

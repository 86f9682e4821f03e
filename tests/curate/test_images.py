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

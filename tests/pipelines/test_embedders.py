"""Every model spec loads real weights from files the test writes (nothing is downloaded)."""

import json

import pytest
import torch
from PIL import Image

from pipelines.synth import make_image
from curate.embedders import slug
from pipelines.embedding import load_embedder


def _embed(e, seeds=(1, 2)):
    x = torch.stack([e.transform(make_image(s, (90, 70))) for s in seeds])
    with torch.inference_mode():
        return e.model(x)


def test_pixels_baseline_is_centred_and_sized():
    e = load_embedder("pixels:8")
    assert e.dim == 3 * 8 * 8
    out = _embed(e)
    assert out.shape == (2, 192) and torch.allclose(out.mean(dim=1), torch.zeros(2), atol=1e-6)


def test_timm_loads_a_local_weights_file(tmp_path):
    import timm

    ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    e = load_embedder(f"timm:test_vit:{tmp_path / 'w.pth'}")
    x = torch.stack([e.transform(make_image(3, (90, 70)))])
    with torch.inference_mode():
        assert torch.equal(e.model(x), ref(x))
    assert e.dim == ref.num_features and x.shape[-1] == 160  # preprocessing from the model's own config


def test_timm_rejects_weights_of_another_model(tmp_path):
    import timm

    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_embedder(f"timm:test_vit:{tmp_path / 'w.pth'}")


def test_open_clip_loads_a_local_weights_file(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    ref = open_clip.create_model("tiny-clip-test").eval()
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    e = load_embedder(f"open_clip:tiny-clip-test:{tmp_path / 'clip.pt'}")
    x = torch.stack([e.transform(make_image(4, (90, 70)))])
    with torch.inference_mode():
        assert torch.allclose(e.model(x), ref.encode_image(x))
    assert e.dim == 16


def test_torchscript_descriptor(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(tmp_path / "sscd.pt"))
    e = load_embedder(f"torchscript:{tmp_path / 'sscd.pt'}:96")
    assert e.dim == 8 and e.transform(Image.new("RGB", (50, 40))).shape == (3, 96, 96)


def test_checkpoint_from_our_trainer(tmp_path):
    from train.models import build_backbone, resolve_arch, save_backbone

    arch = resolve_arch("vit_tiny", patch_size=8, img_size=32)
    backbone = build_backbone(arch)
    save_backbone(str(tmp_path / "teacher_backbone.pt"), backbone, arch, image_size=32)
    e = load_embedder(f"checkpoint:{tmp_path / 'teacher_backbone.pt'}")
    assert e.dim == arch["embed_dim"] and e.transform(make_image(5)).shape == (3, 32, 32)
    out = _embed(e)
    with torch.inference_mode():
        assert torch.allclose(out, backbone.eval()(torch.stack([e.transform(make_image(s, (90, 70))) for s in (1, 2)]))["cls"])


def test_unknown_specs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model spec"):
        load_embedder("clipp:ViT-B-32")
    with pytest.raises(ValueError, match="needs a model name"):
        load_embedder("timm")
    assert slug("timm:vit_small_patch14_dinov2.lvd142m") == "timm-vit_small_patch14_dinov2.lvd142m"
    assert slug("checkpoint:/runs/a/teacher_backbone.pt") == "checkpoint-teacher_backbone"


def test_colour_histogram_is_a_normalised_palette_descriptor():
    e = load_embedder("colorhist:4")
    assert e.dim == 64
    red, blue = Image.new("RGB", (40, 30), (250, 5, 5)), Image.new("RGB", (50, 20), (5, 5, 250))
    with torch.inference_mode():
        out = e.model(torch.stack([e.transform(red), e.transform(blue)]))
    assert torch.allclose(out.pow(2).sum(dim=1), torch.ones(2))  # square-rooted frequencies
    assert out[0].argmax().item() == 3 * 16 and out[1].argmax().item() == 3 and float(out[0] @ out[1]) == 0

"""DenseNet121 builder: 14 logits at any resolution, clear offline error, safe local weights."""

import os
import urllib.error

import pytest
import torch
import torchvision

from cxrlib.models import WeightsUnavailableError, build_model, imagenet_weights_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("resolution", [32, 64])
def test_fourteen_logits_at_each_resolution(resolution):
    model = build_model("none").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, 14)


def test_memory_efficient_computes_the_same_function():
    torch.manual_seed(0)
    plain = build_model("none")
    torch.manual_seed(0)
    checkpointed = build_model("none", memory_efficient=True)
    x = torch.randn(2, 3, 64, 64)
    plain(x).sum().backward()
    checkpointed(x).sum().backward()
    grad = plain.features.conv0.weight.grad
    assert torch.allclose(checkpointed.features.conv0.weight.grad, grad, rtol=1e-4, atol=1e-6)


def test_a_memory_efficient_step_counts_the_batch_once_in_batchnorm_and_then_predicts_the_same():
    def one_step(memory_efficient):
        torch.manual_seed(0)
        model = build_model("none", memory_efficient=memory_efficient)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        model(x).sum().backward()  # training mode: BatchNorm updates its running statistics
        optimizer.step()
        with torch.no_grad():
            return model.state_dict(), model.eval()(x)  # eval mode: predictions use those statistics

    (plain, plain_out), (efficient, efficient_out) = one_step(False), one_step(True)
    assert efficient["features.denseblock1.denselayer1.norm1.num_batches_tracked"] == 1
    for name, value in plain.items():
        torch.testing.assert_close(efficient[name], value, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(efficient_out, plain_out, rtol=1e-4, atol=1e-5)


def test_imagenet_without_network_says_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        build_model("imagenet")
    message = str(error.value)
    assert str(imagenet_weights_file()) in message
    assert imagenet_weights_file().name == "densenet121-a639ec97.pth"
    assert str(tmp_path) in message and "--weights none" in message


def torchvision_style_file(path, num_classes=1000):
    """A state dict as torchvision's DenseNet files store it: "norm.1" for "norm1", no num_batches_tracked."""
    source = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    renamed = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in (("norm1", "norm.1"), ("conv1", "conv.1"), ("norm2", "norm.2"), ("conv2", "conv.2")):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{new}.")
        renamed[key] = value
    torch.save(renamed, path)
    return source


def test_local_torchvision_file_loads_and_the_classifier_is_replaced(tmp_path):
    path = tmp_path / "densenet121-imagenet.pth"
    source = torchvision_style_file(path)
    with pytest.warns(UserWarning, match="freshly initialised classifier"):
        model = build_model(path)
    assert model.classifier.out_features == 14
    layer = model.features.denseblock1.denselayer1.norm1.weight
    assert torch.equal(layer, source.features.denseblock1.denselayer1.norm1.weight)


def test_our_own_ddp_state_dict_loads_exactly(tmp_path):
    trained = build_model("none")
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "best.pt")
    model = build_model(tmp_path / "best.pt")
    assert torch.equal(model.classifier.weight, trained.classifier.weight)


def test_weights_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"classifier.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        build_model(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="--weights none"):
        build_model(tmp_path / "absent.pt")


@pytest.mark.parametrize("resolution", [32, 64])
def test_the_head_computes_in_float32_under_bf16_autocast(resolution):
    torch.manual_seed(0)
    model = build_model("none").eval()
    plain = torchvision.models.densenet121(weights=None, num_classes=14).eval()
    plain.load_state_dict(model.state_dict())  # same layers and keys as torchvision's
    x = torch.randn(4, 3, resolution, resolution)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x), plain(x)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    # a bf16 logit is a float32 whose low 16 bits are zero; ours are not rounded that way
    assert ((ours.view(torch.int32) & 0xFFFF) != 0).float().mean() > 0.95
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)  # without autocast: the same function


def test_the_global_context_block_starts_as_the_plain_network_and_lets_each_position_see_all(tmp_path):
    from cxrlib.models import load_trained_model, load_weights_into

    torch.manual_seed(0)
    plain = build_model("none").eval()
    wide = build_model("none", global_context=True).eval()
    block = wide.features.globalcontext
    channels, hidden = 1024, 64  # dense block 3's output, a 1/16 bottleneck
    expected = (channels + 1) + (channels * hidden + hidden) + 2 * hidden + (hidden * channels + channels)
    assert sum(p.numel() for p in block.parameters()) == expected == 133_313
    load_weights_into(wide, plain.state_dict())  # a plain model's weights: the block starts as the identity
    x = torch.randn(2, 3, 128, 128)
    features = torch.randn(1, channels, 8, 8)
    far = features.clone()
    far[..., 7, 7] += 1.0  # a change in one corner of the map
    with torch.no_grad():
        assert torch.allclose(wide(x), plain(x), atol=1e-5)
        assert torch.equal(block(features)[..., 0, 0], block(far)[..., 0, 0])
        torch.nn.init.normal_(block.transform[-1].weight)  # as after training: the block is used
        assert not torch.allclose(block(features)[..., 0, 0], block(far)[..., 0, 0])  # seen in the other
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    loaded = load_trained_model(tmp_path / "wide.pt")
    assert hasattr(loaded.features, "globalcontext")
    with torch.no_grad():
        assert torch.allclose(loaded(x), wide(x), atol=1e-5)

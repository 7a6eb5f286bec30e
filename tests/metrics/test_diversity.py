"""Diversity metrics vs explicit pair loops and a hand-written LPIPS on a torchvision backbone."""
import os

import pytest
import torch
import torch.nn.functional as F

from nemo_aligner_draft.metrics import EmbeddingDiversity, LpipsDiversity, diversity_per_prompt


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights (torchvision goes through torch.hub) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # the reference LPIPS's torchvision call
def test_lpips_per_prompt_equals_explicit_pair_loop():
    import lpips

    metric = LpipsDiversity(net="alex", pnet_rand=True, batch_size=4)
    ref_net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ref_net.load_state_dict(metric.lpips.state_dict())  # same random backbone, independent module
    images = _images(7, seed=1)
    prompts = ["a", "b", "a", "a", "b", "c", "a"]  # a: 4 images (6 pairs), b: 2 (1 pair), c: 1 (none)
    out = metric(images, prompts)
    expected = {}
    with torch.no_grad():
        for p in ("a", "b"):
            ks = [k for k, q in enumerate(prompts) if q == p]
            ds = [ref_net(2 * images[i:i + 1] - 1, 2 * images[j:j + 1] - 1).item()
                  for x, i in enumerate(ks) for j in ks[x + 1:]]
            expected[p] = sum(ds) / len(ds)
    assert set(out["per_prompt"]) == {"a", "b"}
    for p in expected:
        assert abs(out["per_prompt"][p] - expected[p]) < 1e-6
    assert abs(out["mean"] - (expected["a"] + expected["b"]) / 2) < 1e-6
    assert expected["a"] > 0


def test_identical_images_have_zero_diversity():
    metric = LpipsDiversity(net="alex", pnet_rand=True)
    x = _images(1, seed=2).repeat(3, 1, 1, 1)
    assert metric(x, ["p"] * 3)["mean"] < 1e-6
    y = _images(3, seed=3)
    assert metric(y, ["p"] * 3)["mean"] > 1e-3


def _handwritten_lpips_alex(tv_model, lin_sd, a, b):
    """LPIPS v0.1 from its definition on torchvision's AlexNet: inputs in [0,1] → [−1,1] → (x − shift)/scale;
    features after the ReLUs at features[1, 4, 7, 9, 11]; unit-normalise channels; squared difference;
    1×1 linear heads; spatial mean; sum over layers."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def feats(x):
        h, out = (2 * x - 1 - shift) / scale, []
        for k, layer in enumerate(tv_model.features[:12]):  # the final max-pool is not used
            h = layer(h)
            if k in (1, 4, 7, 9, 11):
                out.append(h)
        return out

    total = torch.zeros(a.shape[0])
    for layer, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin_sd[f"lin{layer}.model.1.weight"]  # [1, C, 1, 1]
        total += ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_with_local_torchvision_backbone_matches_definition(tmp_path):
    import lpips
    import torchvision

    torch.manual_seed(5)
    tv_alex = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(tv_alex.state_dict(), path)
    metric = LpipsDiversity(net="alex", backbone_path=str(path))
    # the backbone really is the file's weights (not lpips' random init)
    torch.testing.assert_close(metric.lpips.net.slice1[0].weight, tv_alex.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(metric.lpips.net.slice5, "10").bias, tv_alex.features[10].bias, rtol=0, atol=0)
    lin_sd = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"),
                        map_location="cpu", weights_only=True)
    a, b = _images(3, size=48, seed=6), _images(3, size=48, seed=7)
    with torch.no_grad():
        ours = metric.distance(a, b)
        ref = _handwritten_lpips_alex(tv_alex, lin_sd, a, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vgg_backbone_keys_map_and_classifier_is_ignored(tmp_path):
    import torchvision

    torch.manual_seed(8)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16.features, no classifier
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # present in real files; not used by LPIPS
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    metric = LpipsDiversity(net="vgg", backbone_path=str(path))
    torch.testing.assert_close(getattr(metric.lpips.net.slice5, "28").weight, features[28].weight, rtol=0, atol=0)
    torch.testing.assert_close(getattr(metric.lpips.net.slice2, "5").weight, features[5].weight, rtol=0, atol=0)


def test_lpips_offline_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone_path"):
        LpipsDiversity(net="alex")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LpipsDiversity(net="alex", backbone_path=str(tmp_path / "nope.pth"))
    torch.save({"classifier.0.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth.*'features.0.weight'"):
        LpipsDiversity(net="alex", backbone_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="net must be one of"):
        LpipsDiversity(net="resnet", pnet_rand=True)


def test_embedding_diversity_equals_mean_cosine_distance():
    proj = torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(9))

    def embed(x):
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ proj

    images = _images(5, seed=10)
    prompts = ["x", "x", "x", "y", "y"]
    out = EmbeddingDiversity(embed)(images, prompts)
    e = embed(images)
    ref = {}
    for p, ks in (("x", [0, 1, 2]), ("y", [3, 4])):
        ds = [1 - F.cosine_similarity(e[i], e[j], dim=0).item() for x, i in enumerate(ks) for j in ks[x + 1:]]
        ref[p] = sum(ds) / len(ds)
    for p in ref:
        assert abs(out["per_prompt"][p] - ref[p]) < 1e-6
    assert abs(out["mean"] - (ref["x"] + ref["y"]) / 2) < 1e-6


def test_no_pairs_gives_nan_and_length_mismatch_errors():
    d = lambda u, v: (u - v).abs().flatten(1).mean(1)  # noqa: E731
    out = diversity_per_prompt(_images(2), ["a", "b"], d)
    assert out["per_prompt"] == {} and out["mean"] != out["mean"]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        diversity_per_prompt(_images(3), ["a", "b"], d)

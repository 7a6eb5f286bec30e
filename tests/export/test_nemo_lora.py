"""NeMo-Aligner LoRA compatibility on tiny models: ``sdlora`` adapts exactly the LinearWrappers NeMo's
SDLoraPEFTConfig adapts, with NeMo's initialisation and network_alpha scale; tiny NeMo-Aligner adapter
checkpoints written in NeMo's layouts (PEFT ``.nemo``, Lightning ``.ckpt`` with OmegaConf
hyper_parameters; :mod:`nemo_aligner_draft.testing.nemo_lora`) import — feed-forward and ``init_model.*``
included — and export back bit for bit."""
import math
import os
import tarfile

import pytest
import torch

from nemo_aligner_draft.cli.convert import main as convert
from nemo_aligner_draft.testing.nemo_lora import (
    POLICY,
    REFERENCE,
    TINY_NEMO_UNET,
    nemo_adapter_state,
    nemo_linear_wrappers,
    nemo_model_config,
    write_lightning_ckpt,
    write_peft_nemo,
)

# the transformer blocks of the tiny UNet (testing/tiny.py): CrossAttnDownBlock2D on level 1, the mid
# block, CrossAttnUpBlock2D on level 0 (two layers), one transformer layer each
TINY_BLOCKS = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
               "up_blocks.0.attentions.1"]
# NeMo v2.1.0 attention.py: every LinearWrapper of a BasicTransformerBlock, in diffusers names
# (to_q 297, to_k/to_v 285-286, to_out.0 299-301, GEGLU proj 106 -> ff.net.0.proj, ff.net.3 130 -> ff.net.2)
BLOCK_LINEARS = [f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")] + \
    ["ff.net.0.proj", "ff.net.2"]
EXPECTED = sorted(f"{b}.transformer_blocks.0.{m}" for b in TINY_BLOCKS for m in BLOCK_LINEARS)
NEMO_LINEARS = nemo_linear_wrappers(**TINY_NEMO_UNET)


def _lora_modules(net):
    from peft.tuners.lora import LoraLayer

    return sorted(n for n, m in net.named_modules() if isinstance(m, LoraLayer))


def _backend(path, **kwargs):
    from nemo_aligner_draft.backends import load_backend, lora_targets

    backend = load_backend(path)
    backend.add_lora(4, kwargs.pop("alpha", None), lora_targets(backend.family, "sdlora"), **kwargs)
    return backend


# --------------------------------------------------------------------------- the scheme
@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl")))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sdlora_adapts_exactly_nemos_linear_wrappers(family, tiny_sd_dir, tiny_sdxl):
    from nemo_aligner_draft.export.nemo_adapters import adapter_module_map

    backend = _backend(tiny_sd_dir if family == "sd" else tiny_sdxl)
    assert _lora_modules(backend.net) == EXPECTED  # 4 blocks x 10 LinearWrappers
    # and each is the NeMo module NeMo's UNetModel builds at that place, of the same shape (the tiny
    # SDXL UNet differs in its cross-attention width: 32 + 48)
    context = 32 if family == "sd" else 80
    nemo = {n: (i, o) for n, i, o in nemo_linear_wrappers(**{**TINY_NEMO_UNET, "context_dim": context})}
    nemo_of = adapter_module_map(backend.net)
    assert sorted(nemo_of.values()) == sorted(nemo)
    modules = dict(backend.net.named_modules())
    for name, nemo_name in nemo_of.items():
        layer = modules[name].base_layer
        assert (layer.in_features, layer.out_features) == nemo[nemo_name], name


def test_sdlora_starts_at_the_reference_with_nemos_init(tiny_sd_dir):
    """linear_out (lora_B) zero, linear_in (lora_A) N(0, 0.2²) — SDLoraPEFTConfig's defaults
    "zero"/"normal" (peft_config.py:404-405, parallel_adapters.py:292-303); "xavier" (NeMo-Aligner's
    draftp_sd.yaml) gives std sqrt(2 / (in + r))."""
    backend = _backend(tiny_sd_dir)
    lora = {n: p for n, p in backend.net.named_parameters() if "lora_" in n}
    assert all(float(p.abs().max()) == 0.0 for n, p in lora.items() if ".lora_B." in n)
    a = torch.cat([p.flatten() for n, p in lora.items() if ".lora_A." in n])
    assert a.numel() > 10000 and abs(float(a.std()) - 0.2) < 0.01 and abs(float(a.mean())) < 0.01
    backend.setup_reference(use_adapters=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        policy = backend.net(sample=x, timestep=torch.tensor([10, 500]), **cond).sample
        with backend.reference_model.view() as ref:
            reference = ref(sample=x, timestep=torch.tensor([10, 500]), **cond).sample
    assert torch.equal(policy, reference)

    xavier = _backend(tiny_sd_dir, column_init_method="xavier")
    ratios = []
    for n, p in xavier.net.named_parameters():
        if ".lora_A." in n:
            ratios.append(p.flatten() / math.sqrt(2.0 / (p.shape[0] + p.shape[1])))
    z = torch.cat(ratios)
    assert abs(float(z.std()) - 1.0) < 0.03
    with pytest.raises(ValueError, match="column_init_method/row_init_method"):
        _backend(tiny_sd_dir, column_init_method="uniform")


@pytest.mark.parametrize("network_alpha, scale", [(None, 1.0), (8.0, 2.0), (2.0, 0.5)])
def test_network_alpha_gives_nemos_scale(tiny_sd_dir, network_alpha, scale):
    """NeMo: y = W x + (network_alpha / r if network_alpha else 1) · linear_out(linear_in(x))
    (LinearWrapper.forward, attention.py:235-238)."""
    backend = _backend(tiny_sd_dir, alpha=network_alpha)
    layer = dict(backend.net.named_modules())["mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, layer.base_layer.in_features, dtype=torch.float64)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    w, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    nemo_alpha = network_alpha
    expected = x @ w.T + bias + (nemo_alpha / 4 if nemo_alpha else 1.0) * (x @ a.T @ b.T)
    layer.double()
    with torch.no_grad():
        got = layer(x)
    assert layer.scaling["default"] == scale
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_adapter_dropout_acts_on_the_adapter_output_as_nemos(tiny_sd_dir):
    """NeMo's ParallelLinearAdapter drops out its output (dropout_position 'post', parallel_adapters.py:
    355-356): each element of the update is either dropped or scaled by 1/(1-p), in train mode only."""
    backend = _backend(tiny_sd_dir, alpha=None, dropout=0.5)
    layer = dict(backend.net.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(64, layer.base_layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x)
        full = (x @ layer.lora_A["default"].weight.T) @ layer.lora_B["default"].weight.T
        layer.eval()
        torch.testing.assert_close(layer(x) - base, full)
        layer.train()
        torch.manual_seed(0)
        dropped = layer(x) - base
    kept = dropped.abs() > 1e-7
    assert 0.3 < float(kept.float().mean()) < 0.7
    torch.testing.assert_close(dropped[kept], 2 * full[kept], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- import / export
def _write(kind, path, state, cfg):
    return (write_peft_nemo if kind == "nemo" else write_lightning_ckpt)(path, state, cfg)


def _read_nemo_weights(path):
    from nemo_aligner_draft.export.read import read_nemo_archive

    return read_nemo_archive(path)


def _policy_pairs(state):
    """NeMo module → {"linear_in", "linear_out"} (float64) of the policy adapters."""
    by_nemo = {}
    for k, v in state.items():
        if k.startswith(POLICY):
            module, which = k[len(POLICY):].split(".adapter_layer.parallel_linear_adapter.")
            by_nemo.setdefault(module, {})[which[: -len(".weight")]] = v.double()
    return by_nemo


@pytest.mark.parametrize("kind, network_alpha, dtype", [("nemo", None, torch.float32), ("nemo", 8.0, torch.float32),
                                                        ("ckpt", 2.0, torch.float32), ("ckpt", None, torch.bfloat16)])
def test_nemo_aligner_adapters_import_and_export_back_bit_identical(tiny_sd_dir, tmp_path, kind, network_alpha, dtype):
    from diffusers import StableDiffusionPipeline
    from omegaconf import DictConfig

    from nemo_aligner_draft.export.nemo_adapters import adapter_module_map

    state = nemo_adapter_state(NEMO_LINEARS, rank=4, seed=1, dtype=dtype)  # policy + init_model, ff included
    assert any(".ff.net.1.proj." in k for k in state) and any(k.startswith(REFERENCE) for k in state)
    src = _write(kind, str(tmp_path / f"draftp.{kind}"), state, nemo_model_config(4, network_alpha))
    if kind == "ckpt":  # as Lightning writes a ModelPT: the cfg is an OmegaConf DictConfig
        raw = torch.load(src, weights_only=False)
        assert isinstance(raw["hyper_parameters"]["cfg"], DictConfig) and raw["hparams_name"] == "kwargs"
    else:
        with tarfile.open(src) as t:
            assert sorted(t.getnames()) == [".", "./model_config.yaml", "./model_weights.ckpt"]

    lora = str(tmp_path / "lora")
    assert convert(["from-nemo-lora", src, lora, "--base", tiny_sd_dir]) == 0  # alpha from the checkpoint

    # diffusers' own loader applies ΔW = s · linear_out @ linear_in on all 40 LinearWrappers
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    s = network_alpha / 4 if network_alpha else 1.0
    nemo_of = adapter_module_map(pipe.unet)
    inv = {v: k for k, v in nemo_of.items()}
    pairs = _policy_pairs(state)
    assert len(pairs) == 40
    for module, pair in pairs.items():
        key = inv[module] + ".weight"
        got = after[key].double() - before[key].double()
        torch.testing.assert_close(got, s * pair["linear_out"] @ pair["linear_in"], rtol=1e-5, atol=1e-5, msg=key)
    changed = {inv[m] + ".weight" for m in pairs}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in changed)

    # export back: the policy adapters bit for bit, in their dtype; init_model.* only when asked
    for out_kind in ("nemo", "ckpt"):
        out = str(tmp_path / f"back.{out_kind}")
        assert convert(["to-nemo-lora", lora, out, "--base", tiny_sd_dir]) == 0
        config, back = _read_nemo_weights(out)
        policy = {k: v for k, v in state.items() if k.startswith(POLICY)}
        assert set(back) == set(policy)
        assert all(back[k].dtype == dtype and torch.equal(back[k], policy[k]) for k in policy)
        assert config["peft"]["peft_scheme"] == "sdlora" and config["peft"]["lora_tuning"]["adapter_dim"] == 4
        assert config["peft"]["lora_tuning"]["network_alpha"] == network_alpha
    full = str(tmp_path / "back_full.nemo")
    assert convert(["to-nemo-lora", lora, full, "--base", tiny_sd_dir, "--with-init-model"]) == 0
    _, back = _read_nemo_weights(full)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state if k.startswith(POLICY) or "linear_out" in k)


def test_import_takes_alpha_from_the_flag_over_the_checkpoint(tiny_sd_dir, tmp_path):
    from nemo_aligner_draft.export.lora_io import read_lora

    src = write_peft_nemo(str(tmp_path / "a.nemo"), nemo_adapter_state(NEMO_LINEARS, with_reference=False),
                          nemo_model_config(4, 8.0))
    for flag, alpha in ((["--alpha", "null"], 4.0), (["--alpha", "2"], 2.0), ([], 8.0)):
        out = str(tmp_path / f"l{len(flag)}{alpha}")
        assert convert(["from-nemo-lora", src, out, "--base", tiny_sd_dir, *flag]) == 0
        assert read_lora(out)[1]["lora_alpha"] == alpha
    # a bare state dict says nothing: NeMo's default network_alpha null (scale 1)
    bare = str(tmp_path / "bare.ckpt")
    torch.save({"state_dict": nemo_adapter_state(NEMO_LINEARS)}, bare)
    assert convert(["from-nemo-lora", bare, str(tmp_path / "bare"), "--base", tiny_sd_dir]) == 0
    assert read_lora(str(tmp_path / "bare"))[1]["lora_alpha"] == 4.0


def test_our_sdlora_exports_to_a_complete_nemo_adapter_set(tiny_sd_dir, tmp_path):
    """A LoRA of this package's sdlora scheme is NeMo's full adapter set (every LinearWrapper)."""
    from peft.utils import get_peft_model_state_dict

    from nemo_aligner_draft.export.lora import export_lora

    backend = _backend(tiny_sd_dir, alpha=8.0)
    export_lora(backend.net, str(tmp_path / "lora"), family="sd")
    out = str(tmp_path / "draftp.nemo")
    assert convert(["to-nemo-lora", str(tmp_path / "lora"), out, "--base", tiny_sd_dir]) == 0
    config, back = _read_nemo_weights(out)
    assert len(back) == 80 and config["peft"]["lora_tuning"]["network_alpha"] == 8.0
    assert config["target"] == "nemo_aligner.models.mm.stable_diffusion.megatron_sd_draftp_model.MegatronSDDRaFTPModel"
    peft_state = get_peft_model_state_dict(backend.net)
    key = "model.model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.1.proj.adapter_layer." \
          "parallel_linear_adapter.linear_in.weight"
    assert torch.equal(back[key], peft_state["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.lora_A.weight"])


# --------------------------------------------------------------------------- what is refused
def test_foreign_adapters_are_refused_with_one_message(tiny_sd_dir, tmp_path, capsys):
    good = nemo_adapter_state(NEMO_LINEARS, with_reference=False)
    to_q_out = "middle_block.1.transformer_blocks.0.attn1.to_q.adapter_layer.parallel_linear_adapter.linear_out.weight"
    cases = {
        # proj_in is a plain nn.Linear / Conv2d in NeMo: no adapter can sit there
        "no LinearWrapper": {**good, f"{POLICY}middle_block.1.proj_in.adapter_layer.parallel_linear_adapter."
                                     f"linear_in.weight": torch.zeros(4, 64),
                             f"{POLICY}middle_block.1.proj_in.adapter_layer.parallel_linear_adapter."
                             f"linear_out.weight": torch.zeros(64, 4)},
        "not UNet ParallelLinearAdapters": {**good, "model.cond_stage_model.transformer.text_model.encoder.layers.0."
                                                    "self_attn.q_proj_lora.adapter_layer.parallel_linear_adapter."
                                                    "linear_in.weight": torch.zeros(4, 32)},
        "lack linear_in or linear_out": {k: v for k, v in good.items() if not k.endswith(to_q_out)},
        "different ranks": {**{k: v for k, v in good.items() if ".ff.net.3." not in k or "middle_block" not in k},
                            **{k: (torch.zeros(2, v.shape[1]) if "linear_in" in k else torch.zeros(v.shape[0], 2))
                               for k, v in good.items() if ".ff.net.3." in k and "middle_block" in k}},
        "no NeMo-Aligner policy adapters": {k.replace(POLICY, REFERENCE): v for k, v in good.items()},
    }
    for i, (message, state) in enumerate(cases.items()):
        src = str(tmp_path / f"bad{i}.ckpt")
        torch.save({"state_dict": state}, src)
        out = str(tmp_path / f"o{i}")
        assert convert(["from-nemo-lora", src, out, "--base", tiny_sd_dir]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not os.path.exists(out), (message, err)


def test_export_refuses_loras_nemo_cannot_hold(tiny_sd_dir, tmp_path, capsys):
    from nemo_aligner_draft.backends import load_backend
    from nemo_aligner_draft.export.lora import export_lora

    for i, (targets, message) in enumerate(((["proj_in", "to_q"], "have no NeMo LinearWrapper"),
                                            (["to_q", "to_k", "to_v", "to_out.0"], "lacks 8 of 40"))):
        backend = load_backend(tiny_sd_dir)
        backend.add_lora(4, 4.0, targets)
        export_lora(backend.net, str(tmp_path / f"lora{i}"), family="sd")
        out = str(tmp_path / f"o{i}.nemo")
        assert convert(["to-nemo-lora", str(tmp_path / f"lora{i}"), out, "--base", tiny_sd_dir]) == 2
        err = capsys.readouterr().err
        assert message in err and not os.path.exists(out), err
    # the attention-only LoRA with --fill-missing: the feed-forward adapters are zero (ΔW = 0)
    out = str(tmp_path / "filled.ckpt")
    assert convert(["to-nemo-lora", str(tmp_path / "lora1"), out, "--base", tiny_sd_dir, "--fill-missing"]) == 0
    _, back = _read_nemo_weights(out)
    ff = [v for k, v in back.items() if ".ff.net." in k]
    assert len(back) == 80 and len(ff) == 16 and all(float(v.abs().max()) == 0 for v in ff)
    assert convert(["to-nemo-lora", str(tmp_path / "lora1"), str(tmp_path / "x.safetensors"),
                    "--base", tiny_sd_dir]) == 2
    assert "must end in .nemo" in capsys.readouterr().err


def test_lightning_ckpt_hyper_parameters_load_weights_only(tmp_path):
    """The OmegaConf hyper_parameters of a NeMo Lightning checkpoint (DictConfig, ListConfig, value nodes,
    a pathlib.Path value) load through the package's one allow-list with weights_only=True, and the
    import reads network_alpha from them."""
    import pathlib

    from omegaconf import open_dict

    from nemo_aligner_draft.export.read import read_nemo_archive

    cfg = nemo_model_config(4, 16.0)
    with open_dict(cfg):
        cfg.data = {"train": {"dataset_path": [pathlib.Path("/data/shard0"), "/data/shard1"]}}
    state = nemo_adapter_state(NEMO_LINEARS)
    src = write_lightning_ckpt(str(tmp_path / "draftp.ckpt"), state, cfg)
    config, weights = read_nemo_archive(src)
    assert config["peft"]["lora_tuning"]["network_alpha"] == 16.0 and config["target"].endswith("MegatronSDDRaFTPModel")
    assert config["data"]["train"]["dataset_path"][0] == pathlib.Path("/data/shard0")
    assert set(weights) == set(state) and all(torch.equal(weights[k], state[k]) for k in state)

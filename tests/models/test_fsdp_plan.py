"""The FSDP wrap plan (models/fsdp.py::shard_plan) on the real SD1.5 and SDXL UNets (built on the meta
device from testing/realsize.py's published configs) and on the LoRA-adapted tiny UNet: every parameter
falls in exactly one unit, units are blocks and stages before the root, and no unit is so large that
gathering it defeats the sharding. Training with the plan runs in tests/distributed/test_fsdp.py."""
import pytest
import torch

from nemo_aligner_draft.models.fsdp import shard_plan, unit_of
from nemo_aligner_draft.testing import realsize as R


def _unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _units(net):
    plan = shard_plan(net)
    sizes = {u: 0 for u in plan}
    for name, p in net.named_parameters():
        sizes[unit_of(plan, name)] += p.numel()
    return plan, sizes


@pytest.mark.parametrize("name,config,blocks,largest_share", [
    # SD1.5: 16 transformer + 22 ResNet blocks; the largest unit (a 2560→1280 up-stage ResNet) holds
    # 49.2 M of 859.5 M parameters (5.7 %), the root 2.1 M
    ("sd15", R.SD15_UNET, 38, 0.06),
    # SDXL: 70 transformer + 17 ResNet blocks; largest 49.2 M of 2,567 M (1.9 %), the root 7.3 M
    ("sdxl", R.SDXL_UNET, 87, 0.02),
])
def test_real_unets_shard_by_block(name, config, blocks, largest_share):
    net = _unet(config)
    plan, sizes = _units(net)
    assert plan[-1] == "" and len(plan) == len(set(plan))
    kinds = [type(net.get_submodule(u)).__name__ for u in plan[:blocks]]
    assert set(kinds) == {"BasicTransformerBlock", "ResnetBlock2D"}
    stages = plan[blocks:-1]
    assert stages == [f"down_blocks.{i}" for i in range(len(net.down_blocks))] + ["mid_block"] + \
        [f"up_blocks.{i}" for i in range(len(net.up_blocks))]
    total = sum(p.numel() for p in net.parameters())
    assert sum(sizes.values()) == total
    largest = max(sizes.values())
    print(f"{name}: {len(plan)} units, largest {largest / 1e6:.1f} M params ({largest / total:.1%}), "
          f"root {sizes[''] / 1e6:.1f} M")
    assert largest <= largest_share * total
    # a block's parent stage keeps only what lies outside its blocks (samplers, attention projections)
    assert all(sizes[s] < sizes[max(sizes, key=sizes.get)] * 2 for s in stages)


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_lora_adapters_stay_in_their_block(fixture, request):
    from nemo_aligner_draft.backends import load_backend, lora_targets

    backend = load_backend(request.getfixturevalue(fixture))
    backend.add_lora(4, 4, lora_targets(backend.family, "sdlora"))
    net = backend.net
    plan = shard_plan(net)
    lora = [n for n, p in net.named_parameters() if p.requires_grad]
    assert lora
    for n in lora:
        unit = unit_of(plan, n)
        assert unit and type(net.get_submodule(unit)).__name__ == "BasicTransformerBlock", n


def test_a_parameter_outside_every_block_belongs_to_the_root():
    net = _unet(R.SD15_UNET)
    plan = shard_plan(net)
    assert unit_of(plan, "conv_in.weight") == ""
    assert unit_of(plan, "down_blocks.0.downsamplers.0.conv.weight") == "down_blocks.0"
    assert unit_of(plan, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight") == \
        "down_blocks.0.attentions.0.transformer_blocks.0"
    # a name that merely starts like a unit is not inside it
    assert unit_of(["down_blocks.1", ""], "down_blocks.10.x") == ""

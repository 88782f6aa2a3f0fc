"""load_locon: LyCORIS / kohya LoCon state dicts (plain and Tucker) into "lora" and "flora" layers.

State dicts are written by hand from the documented key layout, and the expected outputs computed
in float64 from LoCon's own formulas (dW = up @ down; Tucker: dW[o, i, k] = sum mid[a, b, k] up[o, a]
down[b, i]; scale alpha / r). Where the lycoris-lora package imports, its own modules are compared
too (an optional test)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrtensor_kernels as lk
from oracle import F64, rel_err
from test_serialization import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("reference_backend")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, groups=3)])
        self.proj_in = nn.Conv2d(6, 4, 1)
        self.temporal = nn.Conv1d(4, 5, 3, padding=1)
        self.volume = nn.Conv3d(2, 3, (2, 3, 3), padding=(0, 1, 1))
        self.time_emb = nn.Linear(5, 7)

    def forward(self, x, v):  # x (N, 3, 6, 6), v (N, 2, 2, 4, 4)
        h = self.proj_in(self.down_blocks[1](self.down_blocks[0](x)))
        h = self.temporal(h.flatten(2))
        return self.time_emb(h.mean(-1)), self.volume(v)


PATHS = {"down_blocks.0": "down_blocks_0", "down_blocks.1": "down_blocks_1", "proj_in": "proj_in",
         "temporal": "temporal", "volume": "volume", "time_emb": "time_emb"}


def net():
    torch.manual_seed(0)
    return Net().double()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 6, 6, generator=g, dtype=F64), torch.randn(2, 2, 2, 4, 4, generator=g, dtype=F64)


def locon_tensors(module, rank, tucker, alpha, seed):
    """The documented LoCon tensors for ``module``: down, up (and mid), random, with alpha."""
    g = torch.Generator().manual_seed(seed)
    w = module.weight.shape
    kernel, ones = tuple(w[2:]), (1,) * (len(w) - 2)
    out = {"lora_up.weight": torch.randn((w[0], rank) + ones, generator=g, dtype=F64)}
    if tucker:
        out["lora_down.weight"] = torch.randn((rank, w[1]) + ones, generator=g, dtype=F64)
        out["lora_mid.weight"] = torch.randn((rank, rank) + kernel, generator=g, dtype=F64)
    else:
        out["lora_down.weight"] = torch.randn((rank, w[1]) + kernel, generator=g, dtype=F64)
    if alpha is not None:
        out["alpha"] = torch.tensor(float(alpha))
    return out


def locon_delta(t, weight_shape):
    """LoCon's dW (without the scale), straight from the formulas."""
    up = t["lora_up.weight"].reshape(weight_shape[0], -1)
    if "lora_mid.weight" in t:
        down = t["lora_down.weight"].reshape(up.shape[1], -1)
        return torch.einsum("ab...,oa,bi->oi...", t["lora_mid.weight"], up, down)
    return (up @ t["lora_down.weight"].reshape(up.shape[1], -1)).reshape(weight_shape)


def state_dict_for(model, spec, prefix="lora_unet"):
    """``spec``: {path: (rank, tucker, alpha)}."""
    sd = {}
    for i, (path, (rank, tucker, alpha)) in enumerate(spec.items()):
        for key, t in locon_tensors(model.get_submodule(path), rank, tucker, alpha, seed=10 + i).items():
            sd[f"{prefix}_{PATHS[path]}.{key}"] = t
    return sd


def expected_outputs(model, sd, spec, multiplier=1.0, prefix="lora_unet"):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for path, (rank, _, alpha) in spec.items():
            t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"{prefix}_{PATHS[path]}.")}
            module = twin.get_submodule(path)
            scale = multiplier * (alpha or rank) / rank
            module.weight += scale * locon_delta(t, module.weight.shape)
    return twin(*inputs())


SPEC = {
    "down_blocks.0": (4, False, 2.0),     # plain LoCon on a 3x3 conv
    "down_blocks.1": (5, True, 3.0),      # Tucker LoCon on a grouped conv, rank 5 > C_in/groups = 2 (folded)
    "proj_in": (2, False, None),          # a 1x1 conv, no alpha stored: alpha = rank
    "temporal": (3, True, 1.5),           # Tucker LoCon on a Conv1d
    "volume": (2, False, 4.0),            # plain LoCon on a Conv3d
    "time_emb": (3, False, 0.0),          # a Linear, alpha 0: alpha = rank
}


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_hand_written_state_dict_loads_and_matches_the_formulas(multiplier):
    model = net()
    sd = state_dict_for(model, SPEC)
    sd["lora_unet_down_blocks_0.alpha"] = sd["lora_unet_down_blocks_0.alpha"].half()  # stored in any dtype
    names = lk.load_locon(model, sd, multiplier=multiplier)
    assert names == list(SPEC)
    kinds = {path: type(model.get_submodule(path)).__name__ for path in SPEC}
    assert kinds == {"down_blocks.0": "LoRAConv2d", "down_blocks.1": "FLoRAConv2d", "proj_in": "LoRAConv2d",
                     "temporal": "FLoRAConv1d", "volume": "LoRAConv3d", "time_emb": "LoRALinear"}
    assert model.down_blocks[1].ranks == (5, 2, 3, 3)  # the input rank clipped to C_in/groups, folded exactly
    assert model.temporal.ranks == (3, 3, 3)
    assert model.time_emb.scale == multiplier * 1.0 and model.down_blocks[0].scale == multiplier * 0.5
    got = model(*inputs())
    want = expected_outputs(net(), sd, SPEC, multiplier)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    # only the adapters train
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{path}.{k}" for path in SPEC for k in model.get_submodule(path).adapter_state()}


def test_kohya_prefixes_one_model_at_a_time():
    model = net()
    unet = state_dict_for(model, {"proj_in": (2, False, 1.0)})
    text = state_dict_for(model, {"time_emb": (3, False, 1.0)}, prefix="lora_te1")
    both = {**unet, **text, "lora_te1_time_emb.lora_up.weight_extra": torch.zeros(1)}
    snap = snapshot(model)
    with pytest.raises(lk.AdapterConfigError,
                       match=r"several models \(prefixes \['lora_te1', 'lora_unet'\]\).*prefix="):
        lk.load_locon(model, both)
    assert_unchanged(model, snap)
    assert lk.load_locon(model, both, prefix="lora_unet") == ["proj_in"]
    assert type(model.time_emb) is nn.Linear
    lycoris = {k.replace("lora_unet", "lycoris"): v for k, v in unet.items()}
    assert lk.load_locon(net(), lycoris) == ["proj_in"]
    with pytest.raises(lk.AdapterConfigError, match=r"none of the prefixes"):
        lk.load_locon(net(), {k.replace("lora_unet", "mynet"): v for k, v in unet.items()})
    assert lk.load_locon(net(), {k.replace("lora_unet", "mynet"): v for k, v in unet.items()}, prefix="mynet") == [
        "proj_in"]


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({"lora_unet_proj_in.hada_w1_a": torch.zeros(2, 2)}),
     r"layer 'proj_in': keys \['hada_w1_a'\] are not LoCon's"),
    (lambda sd: sd.update({"lora_unet_proj_in.dora_scale": torch.ones(4, 1, 1, 1)}), r"keys \['dora_scale'\]"),
    (lambda sd: sd.update({"lora_unet_proj_out.lora_up.weight": torch.zeros(4, 2, 1, 1),
                           "lora_unet_proj_out.lora_down.weight": torch.zeros(2, 6, 1, 1)}),
     r"'lora_unet_proj_out': no module of Net is named so"),
    (lambda sd: sd.pop("lora_unet_proj_in.lora_up.weight"), r"lora_down\.weight and lora_up\.weight are both needed"),
    (lambda sd: sd.update({"lora_unet_proj_in.lora_down.weight": torch.zeros(2, 5, 1, 1)}),
     r"lora_down\.weight \[2, 5, 1, 1\] and lora_up\.weight \[4, 2, 1, 1\] do not fit the weight \[4, 6, 1, 1\]"),
    (lambda sd: sd.update({"lora_unet_down_blocks_1.lora_down.weight": torch.zeros(2, 6, 3, 3),
                           "lora_unet_down_blocks_1.lora_up.weight": torch.zeros(6, 2, 1, 1)}),
     r"has all 6 input channels of a conv with groups=3"),
    (lambda sd: sd.update({"lora_unet_time_emb.lora_up.weight": torch.zeros(7, 2),
                           "lora_unet_time_emb.lora_down.weight": torch.zeros(2, 5),
                           "lora_unet_time_emb.lora_mid.weight": torch.zeros(2, 2)}),
     r"lora_mid\.weight given for a Linear"),
    (lambda sd: sd["lora_unet_proj_in.lora_up.weight"].fill_(float("nan")), r"hold non-finite values"),
    (lambda sd: sd.update({"lora_unet_proj_in.alpha": torch.ones(2)}), r"alpha must be a number"),
], ids=["loha", "dora", "unknown-module", "no-up", "shapes", "old-grouped", "mid-on-linear", "nan", "alpha-vector"])
def test_refusals_name_the_layer_and_change_nothing(edit, match):
    model = net()
    sd = state_dict_for(model, {"proj_in": (2, False, 1.0), "down_blocks.0": (3, True, 1.0)})
    edit(sd)
    snap = snapshot(model)
    with pytest.raises(lk.AdapterConfigError, match=match):
        lk.load_locon(model, sd)
    assert_unchanged(model, snap)
    assert not lk.adapter_layers(model)


def test_loaded_layers_train_merge_and_save():
    model = net()
    sd = state_dict_for(model, SPEC)
    lk.load_locon(model, sd)
    want = model(*inputs())
    lk.merge(model)
    for g, w in zip(model(*inputs()), want):
        assert rel_err(g, w) < 1e-12
    lk.unmerge(model)
    (model(*inputs())[0].sum() + model(*inputs())[1].sum()).backward()
    assert all(p.grad is not None for _, layer in lk.adapter_layers(model) for p in layer.adapter_parameters())


def test_against_the_lycoris_package():
    """Optional: lycoris-lora's own LoCon modules (plain and Tucker) on the same model give the
    outputs of the layers load_locon builds from their state dict."""
    lycoris = pytest.importorskip("lycoris")
    for use_tucker in (False, True):
        plain = net()
        theirs = copy.deepcopy(plain)
        network = lycoris.create_lycoris(theirs, 0.8, linear_dim=3, linear_alpha=2.0, algo="locon",
                                         use_tucker=use_tucker, conv_dim=4, conv_alpha=3.0)
        network.apply_to()
        network.double()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        state = network.state_dict()
        assert any(k.endswith("lora_mid.weight") for k in state) == use_tucker
        ours = copy.deepcopy(plain)
        names = lk.load_locon(ours, state, multiplier=0.8)
        assert len(names) == len(network.loras) >= 5
        for got, want in zip(ours(*inputs()), theirs(*inputs())):
            assert rel_err(got, want) < 1e-12

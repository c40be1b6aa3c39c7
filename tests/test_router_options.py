"""Each router option acts: target_depth_weight, router_entropy_weight, router_temperature, router_fn and
router_arch. Every test compares against the option left off, so it fails if the option were ignored.
Tiny models (5 layers, middle_cycle, R = 3) train for a few dozen AdamW steps on a learnable toy stream."""
import pytest
import torch
import torch.nn as nn

from model import MoR, MoRConfig

pytestmark = pytest.mark.usefixtures("one_thread")
V, B, T = 65, 8, 32


def tiny(router="token_choice", **options):
    torch.manual_seed(0)   # the same initial weights for every option value
    return MoR(MoRConfig(n_layer=5, n_head=2, n_embd=32, block_size=T, vocab_size=V, sharing="middle_cycle",
                         n_recursion=3, router=router, **options))


def batches(n):
    """n (x, y) batches of a fixed next-token rule (a random permutation of the vocab): learnable in a few steps."""
    g = torch.Generator().manual_seed(1)
    following = torch.randperm(V, generator=g)
    seq = [torch.randint(V, (n, B), generator=g)]
    for _ in range(T):
        seq.append(following[seq[-1]])
    seq = torch.stack(seq, -1)   # (n, B, T + 1)
    return list(zip(seq[..., :-1].contiguous(), seq[..., 1:].contiguous()))


def train(model, steps=30, lr=1e-2):
    """AdamW steps; returns the training losses (LM loss plus the router's weighted losses)."""
    opt = model.configure_optimizers(0.0, lr, (0.9, 0.95), "cpu")
    losses = []
    for x, y in batches(steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sharpened(model, factor=300):
    """Scale up the token-choice router's weights: untrained, its softmax is almost uniform
    (entropy ~ log 3) because the hidden states are small, which hides what entropy options do."""
    for p in model.router.parameters():
        p.mul_(factor)
    return model


@torch.no_grad()
def router_entropy(model):
    """The token-choice router's mean entropy (after temperature) on a fresh batch, from a train-mode forward."""
    x, y = batches(1)[0]
    model.train()(x, y)
    return float(model.last_route.stats["entropy"])


@torch.no_grad()
def mean_depth(model):
    x, _ = batches(1)[0]
    model.eval()(x)
    return float(model.last_depth.float().mean())


def test_target_depth_weight_pulls_mean_depth_to_target():
    target = 1.2   # of R = 3: most tokens should stop after one step
    depth = {}
    for weight in (0.0, 1.0):
        model = tiny(target_depth=target, target_depth_weight=weight)
        train(model)
        depth[weight] = mean_depth(model)
    assert depth[1.0] < depth[0.0] - 0.5 and abs(depth[1.0] - target) < abs(depth[0.0] - target), depth


def test_entropy_weight_raises_or_lowers_router_entropy():
    entropy = {}
    for weight in (-1.0, 0.0, 1.0):
        model = sharpened(tiny(balancing="none", router_entropy_weight=weight))
        train(model, steps=20)
        entropy[weight] = router_entropy(model)
    assert entropy[-1.0] < entropy[0.0] / 2 and entropy[1.0] > 2 * entropy[0.0], entropy


def test_temperature_flattens_router_softmax():
    entropy = {}
    for temperature in (0.5, 1.0, 4.0):
        model = sharpened(tiny(router_temperature=temperature))   # the same weights for each temperature
        entropy[temperature] = router_entropy(model)
    assert entropy[0.5] < entropy[1.0] - 0.1 and entropy[1.0] < entropy[4.0] - 0.1, entropy


def test_tanh_gate_trains_and_is_zero_at_zero_logit():
    """tanh: g = alpha * tanh(logit) is 0 at logit 0 (sigmoid gives alpha / 2). With the routers zeroed the
    recursion steps then change nothing, so perturbing the shared block leaves the logits as they were."""
    losses = train(tiny("expert_choice", router_fn="tanh"))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    x, _ = batches(1)[0]
    for fn in ("sigmoid", "tanh"):
        model = tiny("expert_choice", router_fn=fn).eval()
        with torch.no_grad():
            for p in model.router.parameters():
                p.zero_()
            before, _ = model(x)
            for li in {li for step in model.plan.steps for li in step}:   # the shared (recursed) layers
                for p in model.layers[li].parameters():
                    p.add_(torch.randn_like(p))
            after, _ = model(x)
        assert torch.allclose(before, after) == (fn == "tanh"), fn


def test_mlp_router_trains_and_is_an_mlp():
    losses = train(tiny("expert_choice", router_arch="mlp"))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    linear, mlp = tiny("expert_choice"), tiny("expert_choice", router_arch="mlp")
    assert not any(isinstance(m, nn.Sequential) for m in linear.router.modules())
    assert any(isinstance(m, nn.Sequential) for m in mlp.router.modules())
    assert sum(p.numel() for p in mlp.router.parameters()) > sum(p.numel() for p in linear.router.parameters())

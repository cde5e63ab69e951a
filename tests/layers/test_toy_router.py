"""A router registered from outside the package works everywhere a built-in one does: the
layer (fast dispatch against the reference, outputs and gradients), its own config rule,
``count_params``, training, and expert parallelism."""

import dataclasses

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layers.moe import count_params
from moekit.presets import tiny
from moekit.training import train
from tests.layers.toy_router import TemperedRouter

CONFIG = dict(d_model=16, d_ff=24, num_experts=6, top_k=2, router="toy_tempered")


def test_the_registered_router_is_built_and_checks_its_own_rule():
    layer = MoE(MoEConfig(**CONFIG))
    assert type(layer.router) is TemperedRouter
    with pytest.raises(ValueError, match="top_k must be 1 or 2 for router 'toy_tempered', got 3"):
        MoEConfig(**{**CONFIG, "top_k": 3})


@pytest.mark.parametrize("fields", [{}, {"router_bias": True, "num_shared_experts": 1}, {"capacity_factor": 0.8}])
def test_fast_dispatch_equals_the_reference_in_outputs_and_gradients(fields):
    torch.manual_seed(0)
    fast = MoE(MoEConfig(**CONFIG, **fields))
    ref = MoE(MoEConfig(**CONFIG, **fields, implementation="reference"))
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.router.log_temp.uniform_(-0.5, 0.5)
        ref.router.log_temp.copy_(fast.router.log_temp)
    x, g = torch.randn(3, 20, 16), torch.randn(3, 20, 16)
    outs = []
    for layer in (fast, ref):
        out = layer(x)
        (out.output * g).sum().add(out.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].output, outs[1].output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert fast.router.log_temp.grad.abs().sum() > 0  # the router's own parameter learns


@pytest.mark.parametrize("fields", [{}, {"router_bias": True}, {"num_shared_experts": 2, "shared_expert_gate": True}])
def test_count_params_asks_the_router(fields):
    config = MoEConfig(**CONFIG, **fields)
    layer = MoE(config)
    assert count_params(config).total == sum(p.numel() for p in layer.parameters())
    assert count_params(config) == layer.num_params()


def test_a_model_with_the_router_trains(tmp_path):
    c = tiny()
    model = dataclasses.replace(c.model, moe=dataclasses.replace(c.model.moe, router="toy_tempered"))
    train_cfg = dataclasses.replace(c.train, max_steps=4, log_every=1, checkpoint_every=4, eval_every=4,
                                    progress=False)
    config = dataclasses.replace(c, model=model, data=dataclasses.replace(c.data, max_chars=30_000), train=train_cfg)
    summary = train(config, tmp_path, log=lambda _: None)
    assert summary["steps"] == 4 and summary["val_loss"] < 5.55  # below a uniform guess over bytes
    from moekit.checkpoint import load_trained

    trained, _, _ = load_trained(tmp_path)
    temps = [b.ffn.router.log_temp for b in trained.blocks if b.is_moe]
    assert temps and all(t.abs().sum() > 0 for t in temps)  # moved from their zero init


def _parallel_case(rank, world):
    import tests.layers.toy_router  # noqa: F401  (registers the router in this process)
    from tests.distributed.test_expert_parallel import _layer_case

    _layer_case(rank, world, world, {"router": "toy_tempered"}, 6, False)


@pytest.mark.distributed
def test_expert_parallelism_reproduces_one_process():
    from tests.distributed.test_expert_parallel import run_ranks

    run_ranks(2, _parallel_case)

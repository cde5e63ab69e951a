"""Expert offloading: the same logits and tokens as the resident model at every budget and
policy, a cache that never holds more than its budget, exact counters on a scripted
routing sequence, and clear errors for what cannot work."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.budget import parse_bytes
from moekit.config import ModelConfig, MoEConfig
from moekit.data import ByteTokenizer
from moekit.inference import generate_batch
from moekit.inference.expert_cache import ExpertCache
from moekit.interop import load_model, save_hf
from moekit.interop.hf import save_run
from moekit.interop.safetensors_ranges import read_tensor, tensor_locations
from moekit.models import Transformer
from tests.reliability.conftest import cli

E, D, F, K = 6, 32, 24, 2
EXPERT = 3 * D * F * 4  # bytes of one float32 expert


def moe_model(**model) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 256, "d_model": D, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
                            "max_seq_len": 64, "moe": MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), **model})
    return Transformer(config).eval()


def fused_copy(src, dst):
    """``src`` (a Mixtral directory) rewritten in transformers 5's fused expert layout."""
    dst.mkdir()
    state, out = load_file(str(src / "model.safetensors")), {}
    for k, v in state.items():
        if ".block_sparse_moe.experts." in k:
            continue
        out[k.replace(".block_sparse_moe.", ".mlp.")] = v
    layers = {int(k.split(".")[2]) for k in state if ".block_sparse_moe.gate." in k}
    for i in layers:
        p = f"model.layers.{i}.block_sparse_moe.experts"
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([state[f"{p}.{e}.w1.weight"], state[f"{p}.{e}.w3.weight"]]) for e in range(E)])  # [E, 2f, d]
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([state[f"{p}.{e}.w2.weight"] for e in range(E)])
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One model stored three ways: a moekit run, a Mixtral directory, the fused layout."""
    root = tmp_path_factory.mktemp("offload")
    model = moe_model()
    save_run(root / "run", model, ByteTokenizer(), {})
    save_hf(model, root / "hf")
    fused_copy(root / "hf", root / "fused")
    return root, model


def _generate(model, prompts, n=12):
    return generate_batch(model, prompts, n, temperature=0)


@pytest.mark.parametrize("layout", ["run", "hf", "fused"])
@pytest.mark.parametrize("experts,policy,prefetch", [(K, "lru", False), (K, "lru", True), (5, "lfu", True),
                                                     (9, "lru", 1), (3 * E, "lru", True)])
def test_offloaded_equals_resident_at_every_budget(stored, layout, experts, policy, prefetch):
    root, model = stored
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-experts budget says it offloads nothing
        loaded = load_model(root / layout, expert_memory=experts * EXPERT, policy=policy, prefetch=prefetch).model
    offload = loaded.expert_offload
    try:
        with torch.no_grad():
            got = loaded(ids).logits
            assert (got - model(ids).logits).abs().max().item() < 1e-5
        prompts = [ids[0, :9].tolist(), ids[1, :5].tolist()]
        for batch in ([prompts[0]], prompts):  # batch 1 (the decoder's one-row path) and a padded batch
            assert _generate(loaded, batch).tokens == _generate(model, batch).tokens
        assert offload.cache.peak_bytes <= experts * EXPERT and offload.cache.capacity == experts
        assert offload.stats.misses > 0 and offload.stats.bytes_read >= offload.stats.misses * EXPERT
        if not prefetch:
            assert offload.stats.prefetched == 0 and offload.stats.bytes_read == offload.stats.misses * EXPERT
    finally:
        offload.close()


def test_the_budget_changes_nothing_but_speed(stored):
    """Bitwise: every budget computes the same experts on the same weights."""
    root, _ = stored
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    outs = []
    for experts, prefetch in ((K, False), (4, True), (3 * E, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_model(root / "run", expert_memory=experts * EXPERT, prefetch=prefetch).model
        with torch.no_grad():
            outs.append((loaded(ids).logits, _generate(loaded, [ids[0].tolist()], 8).tokens))
        loaded.expert_offload.close()
    for logits, tokens in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and tokens == outs[0][1]


def test_prefetch_reads_as_many_guesses_as_asked(stored):
    root, _ = stored
    counts = []
    for prefetch in (True, 1):
        loaded = load_model(root / "run", expert_memory=3 * E * EXPERT, prefetch=prefetch).model
        offload = loaded.expert_offload
        with torch.no_grad():
            loaded(torch.tensor([[7]]))  # one token: layers 1 and 2 get that token's guesses
        offload.close()
        counts.append(offload.stats.prefetched)
    assert counts == [2 * K, 2]  # top_k guesses, then the surest one, in each of layers 1 and 2 (nothing cached yet)
    with pytest.raises(ValueError, match="prefetch must be"):
        load_model(root / "run", expert_memory="1GB", prefetch=K + 1)


def test_generation_reports_the_cache(stored):
    root, _ = stored
    loaded = load_model(root / "run", expert_memory=4 * EXPERT).model
    stats = _generate(loaded, [[1, 2, 3, 4]], 10).stats
    loaded.expert_offload.close()
    uses = stats.offload.hits + stats.offload.misses
    assert uses == stats.decode_steps * 3 * K  # every decoded token uses top_k experts in each of 3 layers
    assert "hit rate" in stats.summary() and "MiB read per token" in stats.summary()


def _scripted(capacity, policy, counts=None, prefetch=False):
    reads = []

    def read(layer, e):
        reads.append((layer, e))
        return (torch.full((4,), float(10 * layer + e)),)  # 16 bytes

    return ExpertCache(read, 16, capacity * 16, policy=policy, prefetch=prefetch, counts=counts), reads


def _use(cache, *keys):
    for layer, e in keys:
        with cache.expert(layer, e) as (w,):
            assert w[0].item() == 10 * layer + e  # the expert asked for, never another


def test_lru_and_lfu_counters_on_a_scripted_sequence():
    a, b, c = (0, 1), (0, 2), (1, 3)
    lru, reads = _scripted(2, "lru")
    _use(lru, a, b, a, c, b)  # a miss, b miss, a hit, c evicts b (least recent), b evicts a
    s = lru.stats
    assert (s.hits, s.misses, s.evictions, s.bytes_read) == (1, 4, 2, 64)
    assert lru.cached() == [c, b] and reads == [a, b, c, b]
    lfu, _ = _scripted(2, "lfu")
    _use(lfu, a, b, a, c, b)  # c evicts b (1 use against a's 2), b evicts c (1 use, a has 2)
    assert (lfu.stats.hits, lfu.stats.misses, lfu.stats.evictions) == (1, 4, 2) and lfu.cached() == [a, b]
    seeded, _ = _scripted(2, "lfu", counts=[[0, 0, 5], [0, 0, 0, 0]])  # routing statistics favour b
    _use(seeded, a, b, c)
    assert seeded.cached() == [b, c]


def test_prefetch_counters_and_the_layers_it_keeps():
    cache, reads = _scripted(3, "lru", prefetch=True)
    _use(cache, (0, 0), (0, 1))
    assert cache.prefetch(1, [4, 5], keep_layers=(0,)) == 1  # one free slot; layer 0 is kept
    _use(cache, (1, 4), (1, 5))  # the prefetched one is a hit, the other a miss
    s = cache.stats
    assert (s.prefetched, s.prefetch_used, s.hits, s.misses) == (1, 1, 1, 3) and s.prefetch_accuracy == 1.0
    assert cache.prefetch(2, [0], keep_layers=(1,)) == 1  # evicts a layer-0 expert, not layer 1's
    _use(cache, (1, 5))
    assert cache.stats.hits == 2 and (2, 0) in cache.cached() and sorted(reads) == sorted(set(reads))
    cache.close()
    assert cache.cached() == [] and cache.held_bytes() == 0  # closing gives the memory back


def test_budget_errors_and_warnings(stored, tmp_path):
    root, _ = stored
    with pytest.raises(ValueError, match=r"holds 1 expert.*at least 2"):
        load_model(root / "run", expert_memory=EXPERT + 10)
    for bad in ("4 potatoes", "-1GB", "0", ""):
        with pytest.raises(ValueError, match="expert memory"):
            load_model(root / "run", expert_memory=bad)
    with pytest.warns(UserWarning, match="nothing is offloaded"):
        load_model(root / "hf", expert_memory="1GB").model.expert_offload.close()
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("512M") == 2**29
    with pytest.raises(ValueError, match="with expert_memory only"):
        load_model(root / "run", policy="lfu")


def test_what_cannot_be_offloaded_is_refused(stored, tmp_path):
    root, _ = stored
    save_run(tmp_path / "dense", moe_model(dense=True), ByteTokenizer(), {})
    with pytest.raises(ValueError, match="dense model"):
        load_model(tmp_path / "dense", expert_memory="1GB")
    from moekit.shrink import quantize_to

    quantize_to(root / "run", tmp_path / "int8", "int8")
    with pytest.raises(ValueError, match="holds its experts as int8; expert offloading reads float experts"):
        load_model(tmp_path / "int8", expert_memory="1GB")
    with pytest.raises(ValueError, match="do not combine yet"):
        load_model(root / "run", expert_memory="1GB", quantize="int8")
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(str(root / "hf" / "model.safetensors"))
    state.pop("model.layers.1.block_sparse_moe.experts.4.w3.weight")
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((root / "hf" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.block_sparse_moe\.experts\.4\.w3\.weight"):
        load_model(broken, expert_memory="1MB")
    loaded = load_model(root / "run", expert_memory=K * EXPERT).model
    with pytest.raises(RuntimeError, match="inference only"):
        loaded.blocks[0].ffn.experts(torch.zeros(2, D, requires_grad=True), torch.tensor([2, 0, 0, 0, 0, 0]))
    loaded.expert_offload.close()


def test_a_truncated_file_is_named(stored, tmp_path):
    root, _ = stored
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (root / "hf" / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 1000])
    (cut / "config.json").write_text((root / "hf" / "config.json").read_text())
    with pytest.raises(ValueError, match="damaged|not a readable"):
        load_model(cut, expert_memory="1MB")
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert len(header) > 10  # the file cut really held tensors past the cut


def test_read_tensor_reads_exactly_one_slice(tmp_path):
    t = torch.arange(5 * 6 * 3, dtype=torch.float32).view(5, 6, 3)
    save_file({"t": t, "b": t.bfloat16()}, str(tmp_path / "x.safetensors"))
    locs = tensor_locations(tmp_path / "x.safetensors")
    import os

    fd = os.open(tmp_path / "x.safetensors", os.O_RDONLY)
    try:
        assert torch.equal(read_tensor(fd, locs["t"]), t)
        assert torch.equal(read_tensor(fd, locs["t"], 3), t[3])
        assert torch.equal(read_tensor(fd, locs["b"], 4, (2, 5)), t[4, 2:5].bfloat16())
        with pytest.raises(IndexError):
            read_tensor(fd, locs["t"], 5)
    finally:
        os.close(fd)


def test_generate_cli_offloads(stored, capsys):
    from moekit.cli import main

    root, _ = stored
    args = ["generate", "--model", str(root / "run"), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert main([*args, "--expert-memory", str(K * EXPERT), "--offload-policy", "lfu", "--stats"]) == 0
    offloaded = capsys.readouterr()
    assert offloaded.out == resident and "expert cache: hit rate" in offloaded.err
    code, err = cli(capsys, *args, "--no-prefetch")
    assert code != 0 and any("--expert-memory only" in line for line in err)

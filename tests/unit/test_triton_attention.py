"""The Triton attention kernels (ember/attention/triton_*.py) on CPU under Triton's interpreter, against a plain
torch reference written here: decode, extend with a cached prefix, sliding windows, ragged page tables (random
permuted pages, different lengths per request), GQA, MLA. And the Triton backend against the torch backend
through the backend interface, and end to end in an engine on tiny models."""
import random
from types import SimpleNamespace

import pytest
import torch

from tests.triton_interpreter import interpreted

with interpreted():
    # (triton's own jit helpers, tl.zeros..., are decided at its import; 3.5's interpreter cannot run these kernels)
    pytest.importorskip("triton", minversion="3.9")
    from ember.attention import triton_decode, triton_extend, triton_mla
    from ember.attention.triton_decode import paged_decode
    from ember.attention.triton_extend import paged_extend
    from ember.attention.triton_mla import paged_mla_decode

from ember.attention import create_backend, resolve_backend_name  # noqa: E402
from ember.attention.base import GroupBatch  # noqa: E402
from ember.attention.torch_sdpa import TorchSDPABackend  # noqa: E402
from ember.attention.triton_backend import TritonBackend  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpret")


ATOL = 1e-5  # fp32; measured max error ~1e-6 (exp / summation order differ from torch's softmax)


def test_the_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    for kernel in (triton_decode._decode_kernel, triton_extend._extend_kernel, triton_mla._mla_decode_kernel):
        assert isinstance(kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------- the reference
def ragged_batch(rng, prefix, q_len, page_size, num_pages=None):
    """Page tables for requests of prefix[b] + q_len[b] tokens over randomly permuted pages (page 0 unused,
    as in the pool), padded with 0 to the widest: (page_table [B, W] int32, total slots)."""
    need = [-(-(p + n) // page_size) for p, n in zip(prefix, q_len)]
    num_pages = num_pages or sum(need) + 5
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    table = torch.zeros(len(need), max(need) + rng.randint(0, 2), dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor([pages.pop() for _ in range(n)])
    return table, num_pages * page_size


def reference(q, k_pool, v_pool, table, prefix, q_len, page_size, scale, window=None, dv=None):
    """Plain attention per request and head: keys at positions [0, prefix + q_len) looked up slot by slot,
    query i at position prefix + i sees keys at positions <= its own, and with a window the last `window`."""
    H, Hkv = q.shape[1], k_pool.shape[1]
    out, row = [], 0
    for b, (p, n) in enumerate(zip(prefix, q_len)):
        pos = torch.arange(p + n)
        slots = table[b, pos // page_size].long() * page_size + pos % page_size
        k = k_pool[slots].double().repeat_interleave(H // Hkv, dim=1)  # [L, H, DK]
        v = v_pool[slots][..., :dv].double().repeat_interleave(H // Hkv, dim=1)
        qq = q[row:row + n].double()
        scores = torch.einsum("thd,lhd->htl", qq, k) * scale
        q_pos = p + torch.arange(n)
        visible = pos[None, :] <= q_pos[:, None]
        if window:
            visible &= q_pos[:, None] - pos[None, :] < window
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("htl,lhd->thd", scores.softmax(-1), v))
        row += n
    return torch.cat(out).float()


def _case(rng, B, max_prefix, max_q, page_size, H, Hkv, D, dv=None):
    prefix = [rng.choice([0, 1, page_size - 1, page_size, rng.randint(0, max_prefix)]) for _ in range(B)]
    prefix[0] = max_prefix  # always one long request (several key blocks, several splits)
    q_len = [rng.randint(1, max_q) for _ in range(B)]
    table, slots = ragged_batch(rng, prefix, q_len, page_size)
    k_pool, v_pool = torch.randn(slots, Hkv, D), torch.randn(slots, Hkv, dv or D)
    q = torch.randn(sum(q_len), H, D)
    return prefix, q_len, table, k_pool, v_pool, q


def _int32(xs):
    return torch.tensor(xs, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("page_size,H,Hkv,window", [(4, 4, 2, None), (16, 8, 1, None), (4, 4, 4, 5),
                                                     (16, 6, 2, 20), (1, 2, 1, 3)])
def test_paged_decode_matches_the_reference(page_size, H, Hkv, window):
    rng, D = random.Random(page_size * 100 + H), 32
    torch.manual_seed(H)
    for _ in range(2):
        prefix, q_len, table, k_pool, v_pool, q = _case(rng, 5, 300, 1, page_size, H, Hkv, D)
        seq = [p + 1 for p in prefix]
        ref = reference(q, k_pool, v_pool, table, prefix, q_len, page_size, D ** -0.5, window)
        for splits in (1, 2, 8):  # split-K, some splits empty for the short requests
            out = paged_decode(q, k_pool, v_pool, table, _int32(seq), page_size, D ** -0.5, window, splits=splits)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("page_size,H,Hkv,window,D", [(4, 4, 2, None, 32), (16, 4, 1, None, 64), (4, 2, 2, 7, 32),
                                                       (16, 4, 2, 24, 24)])
def test_paged_extend_with_cached_prefix_matches_the_reference(page_size, H, Hkv, window, D):
    rng = random.Random(page_size * 7 + D)
    torch.manual_seed(D)
    # lengths span several query and key blocks (64): prefixes up to 150, chunks up to 80, some of one token
    prefix, q_len, table, k_pool, v_pool, q = _case(rng, 4, 150, 80, page_size, H, Hkv, D)
    q_len[0] = 1  # a decoding request in a mixed batch
    q = q[:sum(q_len)]
    q_loc = _int32([sum(q_len[:b]) for b in range(len(q_len))])
    out = paged_extend(q, k_pool, v_pool, table, _int32(prefix), q_loc, _int32(q_len), max(q_len), page_size,
                       D ** -0.5, window)
    ref = reference(q, k_pool, v_pool, table, prefix, q_len, page_size, D ** -0.5, window)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_paged_extend_runs_mla_as_one_shared_head_with_latent_values():
    rng, r, dr, H, P = random.Random(5), 32, 16, 4, 4
    torch.manual_seed(5)
    prefix, q_len, table, cache, _, q = _case(rng, 3, 40, 20, P, H, 1, r + dr)
    q_loc = _int32([sum(q_len[:b]) for b in range(len(q_len))])
    out = paged_extend(q, cache, cache, table, _int32(prefix), q_loc, _int32(q_len), max(q_len), P, 0.1, dv=r)
    ref = reference(q, cache, cache, table, prefix, q_len, P, 0.1, dv=r)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,window", [(4, None), (20, None), (4, 6)])
def test_paged_mla_decode_matches_the_reference(H, window):
    rng, r, dr, P = random.Random(H), 64, 16, 4
    torch.manual_seed(H)
    prefix, q_len, table, cache, _, _ = _case(rng, 4, 300, 1, P, H, 1, r + dr)
    q_latent, q_rope = torch.randn(len(prefix), H, r), torch.randn(len(prefix), H, dr)
    ref = reference(torch.cat([q_latent, q_rope], -1), cache, cache, table, prefix, q_len, P, 0.125, window, dv=r)
    for splits in (1, 4):
        out = paged_mla_decode(q_latent, q_rope, cache, table, _int32([p + 1 for p in prefix]), P, 0.125, window,
                               splits=splits)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_split_count():
    from ember.attention.triton_decode import num_splits
    assert num_splits(256, 100_000, 64) == 1  # enough programs already
    assert num_splits(8, 100_000, 64) == 16  # batch 1, 8 kv heads, long context: the most splits
    assert num_splits(8, 600, 64) == 2  # but none shorter than 4 key blocks
    assert num_splits(8, 100, 64) == 1
    assert num_splits(3, 3000, 64) == 8  # a power of 2 (11 fit)


def test_half_precision_pools():
    """float16 pools and queries (the GPU's kind; the interpreter cannot do bfloat16 dots): fp32 accumulation,
    outputs in the query dtype. Measured error against the fp64 reference on the same fp16 inputs: ~1e-3."""
    rng, P, H, Hkv, D, r, dr = random.Random(9), 4, 4, 2, 32, 32, 16
    torch.manual_seed(9)
    prefix, q_len, table, k_pool, v_pool, q = _case(rng, 4, 60, 20, P, H, Hkv, D)
    k_pool, v_pool, q = k_pool.half(), v_pool.half(), q.half()
    q_loc = _int32([sum(q_len[:b]) for b in range(len(q_len))])
    out = paged_extend(q, k_pool, v_pool, table, _int32(prefix), q_loc, _int32(q_len), max(q_len), P, D ** -0.5, 7)
    ref = reference(q, k_pool, v_pool, table, prefix, q_len, P, D ** -0.5, 7)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=0)
    B = len(prefix)
    out = paged_decode(q[:B], k_pool, v_pool, table, _int32([p + 1 for p in prefix]), P, D ** -0.5)
    ref = reference(q[:B], k_pool, v_pool, table, prefix, [1] * B, P, D ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=0)
    cache = torch.randn(k_pool.shape[0], 1, r + dr).half()
    q_latent, q_rope = torch.randn(B, H, r).half(), torch.randn(B, H, dr).half()
    out = paged_mla_decode(q_latent, q_rope, cache, table, _int32([p + 1 for p in prefix]), P, 0.125)
    ref = reference(torch.cat([q_latent, q_rope], -1), cache, cache, table, prefix, [1] * B, P, 0.125, dv=r)
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=0)


# ---------------------------------------------------------------------------------------------- the backends
class _Pool:
    """KVCache's `layer` for one layer."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def layer(self, layer_id):
        return self.k, self.v


def _group_batch(rng, page_size, window):
    """A mixed batch: prefill chunks with and without a cached prefix, and decoding requests."""
    prefix = [0, 21, 3, 40, 7]
    q_len = [9, 14, 1, 1, 30]
    table, slots = ragged_batch(rng, prefix, q_len, page_size)
    tables = [[int(p) for p in row if p] for row in table]
    return GroupBatch(prefix, q_len, tables, page_size, window, "cpu"), slots


@pytest.mark.parametrize("window,decode", [(None, False), (6, False), (None, True), (6, True)])
def test_triton_backend_equals_the_torch_backend(window, decode):
    rng, P, H, Hkv, D = random.Random(1), 4, 4, 2, 16
    torch.manual_seed(1)
    gb, slots = _group_batch(rng, P, window)
    if decode:
        gb.q_len = [1] * len(gb.q_len)
    k_pool, v_pool = torch.randn(slots, Hkv, D), torch.randn(slots, Hkv, D)
    T = sum(gb.q_len)
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    layer = SimpleNamespace(num_heads=H, num_kv_heads=Hkv, head_dim=D, scale=D ** -0.5, layer_id=0)
    outs, pools = [], []
    for backend in (TorchSDPABackend(), TritonBackend()):
        pool = _Pool(k_pool.clone(), v_pool.clone())
        outs.append(backend.forward(layer, q, k, v, backend.prepare(gb), pool))
        pools.append(pool)
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)
    assert torch.equal(pools[0].k, pools[1].k) and torch.equal(pools[0].v, pools[1].v)  # same slots written


@pytest.mark.parametrize("decode,up_project", [(True, False), (False, False), (False, True)])
def test_triton_backend_mla_equals_the_torch_backend(decode, up_project):
    rng, P, H, r, dr, dn, dv = random.Random(2), 4, 4, 32, 16, 8, 12
    torch.manual_seed(2)
    gb, slots = _group_batch(rng, P, None)
    if decode:
        gb.q_len = [1] * len(gb.q_len)
    T = sum(gb.q_len)
    cache = torch.randn(slots, 1, r + dr)
    args = (torch.randn(T, H, dn), torch.randn(T, H, dr), torch.randn(T, r), torch.randn(T, dr),
            torch.randn(H, dn, r) * 0.3, torch.randn(H, dv, r) * 0.3)
    # up_project_from 0: the torch backend takes its up-projected path for every chunk (Triton: always absorbed)
    layer = SimpleNamespace(num_heads=H, kv_lora_rank=r, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
                            scale=0.2, layer_id=0, up_project_from=0 if up_project else float("inf"))
    outs = []
    for backend in (TorchSDPABackend(), TritonBackend()):
        pool = _Pool(cache.clone(), None)
        outs.append(backend.forward_mla(layer, *args, backend.prepare(gb), pool))
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)


def _tree(rng, base, m):
    """A random draft tree of m nodes at slots base.. (parents first): positions base + depth, each node seeing
    itself and its ancestors."""
    from ember.speculative.tree import TreeSpec
    parents, depth = [-1] + [rng.randrange(j) for j in range(1, m)], [0] * m
    vis = torch.zeros(m, m, dtype=torch.bool)
    for j in range(m):
        depth[j] = depth[parents[j]] + 1 if j else 0
        a = j
        while a >= 0:
            vis[j, a], a = True, parents[a]
    return TreeSpec(base, [base + d for d in depth], vis)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("mla", [False, True])
def test_triton_backend_tree_masks_equal_the_torch_backends(window, mla):
    """Speculative verify batches: trees from a request's first new slot (a verify) and from inside its new
    tokens (plain queries before the tree see none of it), beside a request without a tree; with and without a
    sliding window (by logical positions, which inside a tree run behind the slots); GQA and MLA."""
    rng, P, H, Hkv, D = random.Random(11), 4, 4, 2, 16
    torch.manual_seed(11)
    prefix, q_len = [13, 30, 8], [7, 9, 23]
    table, slots = ragged_batch(rng, prefix, q_len, P)
    tables = [[int(p) for p in row if p] for row in table]
    trees = [_tree(rng, 13, 7), None, _tree(rng, 8 + 3, 20)]
    gb = GroupBatch(prefix, q_len, tables, P, window, "cpu", trees)
    T = sum(q_len)
    outs = []
    for backend in (TorchSDPABackend(), TritonBackend()):
        meta = backend.prepare(gb)
        if mla:
            r, dr, dn, dv = 256, 16, 8, 12  # (rows of 272: query blocks of 16, so a block starts inside a tree)
            torch.manual_seed(12)
            pool = _Pool(torch.randn(slots, 1, r + dr), None)
            args = (torch.randn(T, H, dn), torch.randn(T, H, dr), torch.randn(T, r), torch.randn(T, dr),
                    torch.randn(H, dn, r) * 0.3, torch.randn(H, dv, r) * 0.3)
            layer = SimpleNamespace(num_heads=H, kv_lora_rank=r, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                                    v_head_dim=dv, scale=0.2, layer_id=0, up_project_from=float("inf"))
            outs.append(backend.forward_mla(layer, *args, meta, pool))
        else:
            torch.manual_seed(12)
            pool = _Pool(torch.randn(slots, Hkv, D), torch.randn(slots, Hkv, D))
            q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
            layer = SimpleNamespace(num_heads=H, num_kv_heads=Hkv, head_dim=D, scale=D ** -0.5, layer_id=0)
            outs.append(backend.forward(layer, q, k, v, meta, pool))
    # (MLA's 272-wide rows and outputs up to ~20: measured max error 1.1e-5)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5 if mla else ATOL, rtol=0)


def _decode_group_batches(seed: int, windows=(None,)):
    """Decode steps: ragged page tables (some longer than the position needs, as a request holding its next
    page), prefixes on page boundaries and inside pages, page sizes 1 to 16, the given windows."""
    rng = random.Random(seed)
    for trial in range(50):
        P = rng.choice([1, 4, 16])
        prefix = [rng.choice([0, 1, P - 1, P, rng.randint(1, 100)]) if trial % 5 else 37
                  for _ in range(rng.randint(1, 6))]
        tables = [rng.sample(range(1, 500), p // P + 1 + rng.randint(0, 1)) for p in prefix]
        yield trial, GroupBatch(prefix, [1] * len(prefix), tables, P, rng.choice(windows), "cpu")


def test_triton_backend_decode_metadata_equals_the_general_one():
    """TritonBackend's decode-step shortcut (one int32 tensor sliced into the vectors and the page table, each slice
    16-byte aligned) builds what its general path builds."""
    for trial, gb in _decode_group_batches(1, (None, 5)):
        a, b = TritonBackend._decode(gb), TritonBackend._general(gb)
        for name in ("write_slots", "page_table", "prefix_lens", "q_lens", "q_loc", "seq_lens"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), (trial, name)
            assert x.data_ptr() % 16 == 0, (trial, name)  # (Triton specializes on 16-byte aligned pointers)
        for name in ("max_seq_len", "page_size", "window", "batch_size", "max_q", "trees"):
            assert getattr(a, name) == getattr(b, name), (trial, name)


def test_torch_backend_decode_metadata_equals_the_general_one():
    """TorchSDPABackend's decode-step shortcut builds what its general path builds."""
    for trial, gb in _decode_group_batches(0):
        a, b = TorchSDPABackend._decode(gb), TorchSDPABackend._general(gb)
        for name in ("write_slots", "kv_slots", "q_pad_index", "kv_lens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (trial, name)
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
        assert (a.batch_size, a.max_q) == (b.batch_size, b.max_q)


def test_backend_choice(monkeypatch):
    assert create_backend(None, "cpu").name == "torch"
    assert resolve_backend_name(None, "cuda") == "torch"  # triton opt-in until its kernels have run on a GPU
    assert create_backend("torch", "cpu").name == "torch"
    assert create_backend("triton", "cpu").name == "triton"  # under TRITON_INTERPRET=1 (this module's fixture)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="triton runs on CUDA; on cpu only under TRITON_INTERPRET=1"):
        create_backend("triton", "cpu")
    with pytest.raises(ValueError, match="flashinfer"):
        create_backend("flashinfer", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        create_backend("sdpa", "cpu")


def test_the_server_refuses_triton_on_cpu_without_the_interpreter(monkeypatch):
    from ember.server_args import check_server_args, parse_serve_args
    monkeypatch.delenv("TRITON_INTERPRET")
    args, given = parse_serve_args(["--attention-backend", "triton", "--device", "cpu"])
    assert any("--attention-backend triton runs on CUDA" in e for e in check_server_args(args, given))
    args, given = parse_serve_args(["--device", "cpu"])
    assert args.attention_backend is None and check_server_args(args, given) == []


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("kind", ["gemma3", "glm4_moe_lite"])
def test_engine_on_the_triton_backend_gives_the_torch_backends_tokens(kind, tmp_path_factory):
    """Tiny Gemma 3 (sliding-window and full layers, two KV groups) and GLM-4.7-Flash (MLA) in an engine on the
    interpreted kernels: batched prompts past the window, chunked prefill, a prefix-cache hit, decode."""
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model(kind, tmp_path_factory.mktemp("tiny") / kind)
    rng = random.Random(3)
    base = [rng.randint(3, 200) for _ in range(24)]
    prompts = [base, [rng.randint(3, 200) for _ in range(5)], base + [rng.randint(3, 200) for _ in range(9)]]
    sampling = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    outputs = {}
    for backend in ("torch", "triton"):
        engine = Engine(model_path=str(path), dtype="float32", device="cpu", attention_backend=backend,
                        page_size=4, chunked_prefill_size=16, max_total_tokens=512)
        assert engine.core.runner.attn_backend.name == backend
        first = engine.generate(input_ids=prompts[0], sampling_params=sampling)["output_ids"]
        rest = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        outputs[backend] = [first] + rest
        del engine
    assert outputs["triton"] == outputs["torch"]

"""Scheduler, KV pool and prefix cache accounting, without a model (the scheduler is pure Python)."""
import random

from ember.engine.kv_pool import PageAllocator
from ember.engine.radix_cache import RadixCache
from ember.engine.request import Req
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler

P = 4


def make(num_pages=64, radix=True, window=None, chunk=64, max_running=8, swa_pages=None):
    allocs = {"full": PageAllocator(num_pages)}
    if window:
        allocs["swa"] = PageAllocator(swa_pages or num_pages)
    cache = RadixCache(allocs["full"], P, allocs.get("swa"), window) if radix else None
    return Scheduler(allocs, P, window=window, radix=cache, max_running=max_running, chunk_size=chunk), allocs


def req(rid, n, max_new=8, start=0):
    return Req(rid, list(range(start, start + n)), SamplingParams(max_new_tokens=max_new))


def check_and_write_kv(s, r, n, memory):
    """Pretend attention: every slot the step reads must hold the KV of the same tokens at the same position
    (what this request would have computed itself), then the step writes its own tokens' KV. The KV of
    position p stands for token_ids[:p + 1]."""
    def slot(g, p):
        page = r.page_tables[g][p // P]
        assert page, f"{r.rid}: {g} page of position {p} is not held"
        return page * P + p % P
    end = r.kv_len + n
    for g in r.page_tables:
        for p in range(r.kv_len, end):
            memory[g][slot(g, p)] = hash(tuple(r.token_ids[:p + 1]))
        first = max(0, r.kv_len - s.window + 1) if g == "swa" else 0
        for p in range(first, end):
            assert memory[g].get(slot(g, p)) == hash(tuple(r.token_ids[:p + 1])), f"{r.rid}: wrong {g} KV at {p}"


def run_step(s, memory=None):
    """Pretend to run the model: advance kv_len, append a token when prefill completes."""
    b = s.schedule()
    if b is None:
        return []
    done = []
    for r, n in zip(b.reqs, b.extend_lens):
        if memory is not None:
            check_and_write_kv(s, r, n, memory)
        r.kv_len += n
        if n > 1:
            s.cache_prefix(r)
        if r.extend_len == 0:
            r.token_ids.append(1000 + r.num_output)
            if r.num_output >= r.sampling.max_new_tokens:
                s.finish(r)
                done.append(r)
    return done


def drain(s, limit=10_000):
    finished = []
    for _ in range(limit):
        if not s.has_work():
            return finished
        finished += run_step(s)
    raise AssertionError("scheduler did not drain")


def all_free(s, allocs):
    """Every page of every group is free or held by the prefix cache, and nothing is locked."""
    cached = {"full": s.radix.num_pages if s.radix else 0, "swa": s.radix.num_swa_pages if s.radix else 0}
    for g, a in allocs.items():
        assert a.num_free + cached[g] == a.total, g
        assert len(set(a._free)) == len(a._free), f"{g}: a page was freed twice"
    if s.radix:
        assert not any(n.ref or n.swa_ref for n in s.radix._iter_nodes())


def test_chunked_prefill_respects_budget():
    s, allocs = make(chunk=16)
    r = req("a", 50)
    s.add(r)
    lens = []
    while r.extend_len > 1 or r.kv_len == 0:
        b = s.schedule()
        lens.append(b.extend_lens[0])
        r.kv_len += b.extend_lens[0]
        if r.extend_len == 0:
            break
    assert lens == [16, 16, 16, 2]


def test_prefix_reuse_and_cached_tokens():
    s, allocs = make()
    a = req("a", 20, max_new=3)
    s.add(a)
    drain(s)
    b = req("b", 20, max_new=3)  # same 20-token prompt
    s.add(b)
    s.schedule()
    assert b.cached_tokens == 16  # whole pages only, and at least one token left to compute
    s.running[0].kv_len = len(b.token_ids)
    s.finish(b)
    all_free(s, allocs)
    assert s.radix.reset()
    assert allocs["full"].num_free == allocs["full"].total


def test_preemption_when_pool_is_short_and_everything_is_freed():
    s, allocs = make(num_pages=12, chunk=64, max_running=8)
    reqs = [req(f"r{i}", 6 + i, max_new=10, start=100 * i) for i in range(8)]
    for r in reqs:
        s.add(r)
    finished = drain(s)
    assert len(finished) == 8
    assert s.total_preemptions > 0
    assert all(r.num_output == 10 for r in reqs)
    all_free(s, allocs)


def test_abort_frees_pages():
    s, allocs = make()
    rs = [req(f"r{i}", 10, max_new=50, start=10 * i) for i in range(4)]
    for r in rs:
        s.add(r)
    for _ in range(5):
        run_step(s)
    assert s.remove("r1") is rs[1] and s.remove("r2") is rs[2]
    assert s.remove("nope") is None
    drain(s)
    assert rs[0].num_output == 50 and rs[3].num_output == 50
    all_free(s, allocs)


def test_sliding_window_group_holds_at_most_the_window():
    window = 8
    s, allocs = make(window=window, radix=False, chunk=4)
    r = req("a", 30, max_new=40)
    s.add(r)
    peak = 0
    while s.has_work():
        run_step(s)
        held = sum(1 for p in r.page_tables.get("swa", []) if p)
        peak = max(peak, held)
    # window tokens + one chunk, rounded to pages, plus a partial page at each end
    assert peak <= (window + 4) // P + 2
    all_free(s, allocs)


def test_random_mix_keeps_accounting():
    rng = random.Random(0)
    s, allocs = make(num_pages=40, chunk=32, max_running=6)
    live = []
    for step in range(400):
        if rng.random() < 0.3:
            n = rng.randint(1, 30)
            start = rng.choice([0, 0, 500, 1000 + step])
            r = req(f"q{step}", n, max_new=rng.randint(1, 12), start=start)
            s.add(r)
            live.append(r)
        if rng.random() < 0.05 and live:
            s.remove(rng.choice(live).rid)
        run_step(s)
    drain(s)
    all_free(s, allocs)
    assert s.radix.reset()
    assert allocs["full"].num_free == allocs["full"].total


def test_radix_eviction_is_lru_and_skips_locked():
    alloc = PageAllocator(10)
    cache = RadixCache(alloc, P)
    pages_a = alloc.alloc(2)
    cache.insert(list(range(8)), pages_a, [])
    pages_b = alloc.alloc(2)
    cache.insert(list(range(100, 108)), pages_b, [])
    locked = cache.match_prefix(list(range(100, 108)))
    cache.lock(locked)
    assert cache.evict(4) == 2  # only a's two pages are evictable
    assert cache.match_prefix(list(range(8))) == []
    cache.unlock(locked)
    assert cache.evict(4) == 2
    assert alloc.num_free == alloc.total


def test_running_request_shares_its_prefix_with_later_arrivals():
    s, allocs = make(chunk=24)
    first = req("a", 40, max_new=20)
    s.add(first)
    run_step(s)
    run_step(s)  # first's prompt is prefilled (24 + 16 tokens) and cached while it decodes
    second = req("b", 40, max_new=2)
    s.add(second)
    s.schedule()
    assert second.cached_tokens == 36  # 9 full pages of the shared 40-token prompt (one token left to compute)
    assert second.page_tables["full"][:9] == first.page_tables["full"][:9]
    drain(s)
    all_free(s, allocs)


# ---------------------------------------------------------------- hybrid (sliding-window) prefix cache
def test_sliding_window_prefix_is_reused_with_its_window():
    window = 8
    s, allocs = make(window=window, chunk=16)
    memory = {"full": {}, "swa": {}}
    prefix = list(range(4 * window))
    a = Req("a", prefix + [900, 901, 902], SamplingParams(max_new_tokens=3))
    s.add(a)
    while s.has_work():
        run_step(s, memory)
    assert s.radix.num_swa_pages > 0
    b = Req("b", prefix + [700, 701], SamplingParams(max_new_tokens=20))
    s.add(b)
    run_step(s, memory)
    assert b.cached_tokens == len(prefix)  # the prefix ends on a page boundary: all of it
    # behind the window: nothing held; inside it: the tree's pages, locked for b
    first = (len(prefix) - window + 1) // P
    assert b.page_tables["swa"][:first] == [0] * first
    assert all(n.swa_ref == 1 for n in b.prefix_nodes[first:])
    while s.has_work():
        run_step(s, memory)
    all_free(s, allocs)
    assert s.radix.reset()
    assert all(a.num_free == a.total for a in allocs.values())


def test_sliding_window_match_needs_the_window_of_the_prefix():
    window = 6
    full, swa = PageAllocator(32), PageAllocator(32)
    cache = RadixCache(full, P, swa, window)
    tokens = list(range(6 * P))
    pages, swa_pages = full.alloc(6), swa.alloc(6)
    cache.insert(tokens, pages, [], swa_pages=list(swa_pages))
    assert len(cache.match_prefix(tokens)) == 6
    nodes = cache.match_prefix(tokens)

    def release_window(i):
        swa.free([nodes[i].swa_page])
        nodes[i].swa_page = 0
        cache.num_swa_pages -= 1
    # a prefix of k pages needs the swa pages of positions k*P - window + 1 .. k*P - 1: pages k-2 and k-1
    release_window(1)
    release_window(4)
    assert len(cache.match_prefix(tokens)) == 4  # pages 2, 3 hold the window of a 4-page prefix
    release_window(3)
    assert len(cache.match_prefix(tokens)) == 1  # page 0 alone: its window is positions 0..3
    # a request that computes the same tokens again fills the released windows
    again = full.alloc(6)
    again_swa = swa.alloc(6)
    cache.insert(tokens, again, [], swa_pages=list(again_swa))
    assert len(cache.match_prefix(tokens)) == 6
    assert cache.num_swa_pages == 6 and cache.num_pages == 6
    assert cache.evict_swa(2) == 2  # oldest first: the root end of the chain becomes tombstones
    assert [n.swa_page == 0 for n in cache.match_prefix(tokens)] == [True, True, False, False, False, False]
    assert cache.reset()
    assert full.num_free == full.total and swa.num_free == swa.total


def test_sliding_window_random_mix_keeps_both_pools_accounted():
    """Finished, aborted and preempted requests with shared prefixes, a small swa pool (the tree's swa pages
    get evicted) and a small full pool (preemption): every read sees the right KV, and at the end every page
    of both pools is free or cached."""
    rng = random.Random(1)
    window = 8
    s, allocs = make(num_pages=48, window=window, swa_pages=20, chunk=16, max_running=5)
    memory = {"full": {}, "swa": {}}
    live = []
    prefixes = [list(range(500, 500 + 24)), list(range(600, 600 + 40))]
    for step in range(600):
        if rng.random() < 0.3:
            body = rng.choice(prefixes)[:rng.randint(0, 40)] + [2000 + step] * rng.randint(1, 10)
            r = Req(f"q{step}", body, SamplingParams(max_new_tokens=rng.randint(1, 30)))
            s.add(r)
            live.append(r)
        if rng.random() < 0.05 and live:
            s.remove(rng.choice(live).rid)
        run_step(s, memory)
    while s.has_work():
        run_step(s, memory)
    assert s.total_preemptions > 0
    assert any(r.cached_tokens for r in live)
    all_free(s, allocs)
    assert s.radix.reset()
    assert all(a.num_free == a.total for a in allocs.values())

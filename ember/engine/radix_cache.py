"""Prefix cache: a radix tree whose edges are whole KV pages (page_size tokens each).

A finished request donates its full pages to the tree; a new request walks the tree with its prompt and
reuses the pages of the longest cached prefix. Nodes in use by running requests are locked (ref > 0);
unlocked leaves are evicted least-recently-used first when the pool runs short.

Hybrid models (sliding-window layers in a second "swa" pool, as SGLang's SWA radix cache): each node also
holds the page of the sliding layers for the same tokens, or 0 once that page was released (a tombstone:
the request had moved more than a window past it, or the swa pool needed it back). A prefix of L tokens is
only usable when the sliding layers still have its last window, so a match stops at the longest prefix
whose pages from position L - window + 1 on all keep their swa page. Requests lock the swa pages inside
their window separately (swa_ref), and give them up as they move past them.
"""
from __future__ import annotations

import itertools

from ember.engine.kv_pool import PageAllocator

_clock = itertools.count()


class Node:
    __slots__ = ("key", "page", "swa_page", "parent", "children", "ref", "swa_ref", "last_access")

    def __init__(self, key: tuple, page: int, parent: "Node | None", swa_page: int = 0):
        self.key, self.page, self.parent, self.swa_page = key, page, parent, swa_page
        self.children: dict[tuple, Node] = {}
        self.ref = 0  # running requests whose prefix includes this page
        self.swa_ref = 0  # running requests that still read this node's swa page (within their window)
        self.last_access = next(_clock)


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, swa_allocator: PageAllocator | None = None,
                 window: int | None = None):
        if (swa_allocator is None) != (window is None):
            raise ValueError("a sliding-window prefix cache needs both the swa pool and the window")
        self.allocator = allocator
        self.swa_allocator = swa_allocator
        self.window = window
        self.page_size = page_size
        self.root = Node((), 0, None)
        self.num_pages = 0  # full pages held by the tree
        self.num_swa_pages = 0  # swa pages held by the tree

    def _keys(self, token_ids, num_pages):
        P = self.page_size
        return (tuple(token_ids[i * P:(i + 1) * P]) for i in range(num_pages))

    def _first_needed_page(self, num_tokens: int) -> int:
        """Index of the first page the sliding layers read when the next token is at `num_tokens`."""
        return max(0, num_tokens - self.window + 1) // self.page_size

    def match_prefix(self, token_ids) -> list[Node]:
        """Nodes of the longest usable cached prefix of `token_ids` (whole pages), root excluded."""
        nodes, node = [], self.root
        for key in self._keys(token_ids, len(token_ids) // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            nodes.append(child)
            node = child
        if self.swa_allocator is not None:
            nodes = nodes[:self._usable_swa_prefix(nodes)]
        for n in nodes:  # root first: parents stay older than children, so eviction trims from the leaves
            n.last_access = next(_clock)
        return nodes

    def _usable_swa_prefix(self, nodes: list[Node]) -> int:
        """Largest k such that nodes[first_needed(k pages):k] all still hold their swa page."""
        last_tomb = [-1] * (len(nodes) + 1)  # last_tomb[k]: index of the last tombstone among nodes[:k]
        for i, n in enumerate(nodes):
            last_tomb[i + 1] = i if n.swa_page == 0 else last_tomb[i]
        for k in range(len(nodes), 0, -1):
            if last_tomb[k] < self._first_needed_page(k * self.page_size):
                return k
        return 0

    @staticmethod
    def lock(nodes) -> None:
        for n in nodes:
            n.ref += 1

    @staticmethod
    def unlock(nodes) -> None:
        for n in nodes:
            n.ref -= 1
            assert n.ref >= 0, "radix node unlocked more often than locked"

    def lock_swa(self, nodes: list[Node]) -> list[int]:
        """The swa page table of a request that resumes after the prefix `nodes` (from match_prefix): 0 for
        the pages behind its window, the tree's pages (locked for the request) for those inside it."""
        first = min(self._first_needed_page(len(nodes) * self.page_size), len(nodes))
        for n in nodes[first:]:
            assert n.swa_page, "matched a prefix whose window was released"
            n.swa_ref += 1
        return [0] * first + [n.swa_page for n in nodes[first:]]

    @staticmethod
    def unlock_swa(node: Node) -> None:
        node.swa_ref -= 1
        assert node.swa_ref >= 0, "radix node's swa page unlocked more often than locked"

    def insert(self, token_ids, pages: list[int], prefix_nodes: list[Node], keep: bool = False,
               swa_pages: list[int] | None = None) -> list[Node]:
        """Give the tree the full pages of `token_ids` (whose KV is in `pages`, and for the sliding layers in
        `swa_pages`, 0 where already released); the first len(prefix_nodes) pages already belong to the tree.

        keep=False (the request is done): pages the tree already has and a trailing partial page are
        freed, and prefix_nodes are unlocked.
        keep=True (the request goes on, e.g. after its prefill): its full pages join the tree and stay
        locked for it; where the tree already had a page for the same tokens, the request's page table
        is pointed at the tree's page (same tokens at the same positions: same KV) and its copy is freed.
        Returns the request's new locked chain."""
        num_full = len(token_ids) // self.page_size
        node = prefix_nodes[-1] if prefix_nodes else self.root
        chain = list(prefix_nodes)
        to_free, swa_free = [], []
        for i, key in enumerate(self._keys(token_ids, num_full)):
            if i < len(prefix_nodes):
                continue
            swa = swa_pages[i] if swa_pages is not None else 0
            child = node.children.get(key)
            if child is None:
                child = Node(key, pages[i], node, swa)
                node.children[key] = child
                self.num_pages += 1
                self.num_swa_pages += bool(swa)
            else:
                if child.page != pages[i]:
                    to_free.append(pages[i])
                    if keep:
                        pages[i] = child.page
                if swa and not child.swa_page:  # the tree had released this window: take the request's
                    child.swa_page = swa
                    self.num_swa_pages += 1
                elif swa and child.swa_page != swa:
                    swa_free.append(swa)
                    if keep:
                        swa_pages[i] = child.swa_page
            child.last_access = next(_clock)
            if keep:
                child.ref += 1
                child.swa_ref += bool(swa)
            chain.append(child)
            node = child
        if not keep:
            to_free.extend(pages[max(num_full, len(prefix_nodes)):])
            if swa_pages is not None:
                swa_free.extend(swa_pages[max(num_full, len(prefix_nodes)):])
                for n, swa in zip(prefix_nodes, swa_pages):
                    if swa:
                        self.unlock_swa(n)
            self.unlock(prefix_nodes)
        self.allocator.free(to_free)
        if swa_free:
            self.swa_allocator.free(swa_free)
        return chain if keep else []

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages full pages from unlocked leaves, oldest first (their swa pages go with
        them). Returns how many full pages were freed."""
        freed = 0
        while freed < num_pages:
            leaves = [n for n in self._iter_nodes() if not n.children and n.ref == 0]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_access)
            for leaf in leaves[:num_pages - freed]:
                freed += self._delete_leaf(leaf)
        return freed

    def evict_swa(self, num_pages: int) -> int:
        """Free up to num_pages swa pages that no request reads, oldest first: an unlocked leaf goes
        entirely (without its window its full pages serve no match), any other node keeps its full page
        and becomes a tombstone. Returns how many swa pages were freed."""
        if self.swa_allocator is None:
            return 0
        candidates = [n for n in self._iter_nodes() if n.swa_page and n.swa_ref == 0]
        candidates.sort(key=lambda n: n.last_access)
        freed = 0
        for n in candidates:
            if freed >= num_pages:
                break
            if not n.children and n.ref == 0:
                self._delete_leaf(n)
            else:
                self.swa_allocator.free([n.swa_page])
                n.swa_page = 0
                self.num_swa_pages -= 1
            freed += 1
        return freed

    def _delete_leaf(self, leaf: Node) -> int:
        """Remove an unlocked leaf, then the unlocked tombstones this leaves as leaves (no match can end on
        a page without its window). Returns the number of full pages freed."""
        freed = 0
        while True:
            parent = leaf.parent
            del parent.children[leaf.key]
            self.allocator.free([leaf.page])
            self.num_pages -= 1
            freed += 1
            if leaf.swa_page:
                self.swa_allocator.free([leaf.swa_page])
                self.num_swa_pages -= 1
            if parent is self.root or parent.children or parent.ref or parent.swa_page:
                return freed
            leaf = parent

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def reset(self) -> bool:
        """Drop every cached page; refuses (False) while any node is locked."""
        nodes = list(self._iter_nodes())
        if any(n.ref or n.swa_ref for n in nodes):
            return False
        self.allocator.free([n.page for n in nodes])
        if self.swa_allocator is not None:
            self.swa_allocator.free([n.swa_page for n in nodes if n.swa_page])
        self.root = Node((), 0, None)
        self.num_pages = self.num_swa_pages = 0
        return True

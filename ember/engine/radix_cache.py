"""Prefix cache: a radix tree whose edges are whole KV pages (page_size tokens each).

A finished request donates its full pages to the tree; a new request walks the tree with its prompt and
reuses the pages of the longest cached prefix. Nodes in use by running requests are locked (ref > 0);
unlocked leaves are evicted least-recently-used first when the pool runs short.
"""
from __future__ import annotations

import itertools

from ember.engine.kv_pool import PageAllocator

_clock = itertools.count()


class Node:
    __slots__ = ("key", "page", "parent", "children", "ref", "last_access")

    def __init__(self, key: tuple, page: int, parent: "Node | None"):
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple, Node] = {}
        self.ref = 0
        self.last_access = next(_clock)


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.root = Node((), 0, None)
        self.num_pages = 0  # pages held by the tree

    def _keys(self, token_ids, num_pages):
        P = self.page_size
        return (tuple(token_ids[i * P:(i + 1) * P]) for i in range(num_pages))

    def match_prefix(self, token_ids) -> list[Node]:
        """Nodes of the longest cached prefix of `token_ids` (whole pages), root excluded."""
        nodes, node = [], self.root
        for key in self._keys(token_ids, len(token_ids) // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = next(_clock)
            nodes.append(child)
            node = child
        return nodes

    @staticmethod
    def lock(nodes) -> None:
        for n in nodes:
            n.ref += 1

    @staticmethod
    def unlock(nodes) -> None:
        for n in nodes:
            n.ref -= 1
            assert n.ref >= 0, "radix node unlocked more often than locked"

    def insert(self, token_ids, pages: list[int], prefix_nodes: list[Node], keep: bool = False) -> list[Node]:
        """Give the tree the full pages of `token_ids` (whose KV is in `pages`); the first len(prefix_nodes)
        pages already belong to the tree.

        keep=False (the request is done): pages the tree already has and a trailing partial page are
        freed, and prefix_nodes are unlocked.
        keep=True (the request goes on, e.g. after its prefill): its full pages join the tree and stay
        locked for it; where the tree already had a page for the same tokens, the request's page table
        is pointed at the tree's page (same tokens at the same positions: same KV) and its copy is freed.
        Returns the request's new locked chain."""
        num_full = len(token_ids) // self.page_size
        node = prefix_nodes[-1] if prefix_nodes else self.root
        chain = list(prefix_nodes)
        to_free = []
        for i, key in enumerate(self._keys(token_ids, num_full)):
            if i < len(prefix_nodes):
                continue
            child = node.children.get(key)
            if child is None:
                child = Node(key, pages[i], node)
                node.children[key] = child
                self.num_pages += 1
            elif child.page != pages[i]:
                to_free.append(pages[i])
                if keep:
                    pages[i] = child.page
            child.last_access = next(_clock)
            if keep:
                child.ref += 1
            chain.append(child)
            node = child
        if not keep:
            to_free.extend(pages[max(num_full, len(prefix_nodes)):])
            self.unlock(prefix_nodes)
        self.allocator.free(to_free)
        return chain if keep else []

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages pages from unlocked leaves, oldest first. Returns how many were freed."""
        freed = 0
        while freed < num_pages:
            leaves = [n for n in self._iter_nodes() if not n.children and n.ref == 0]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_access)
            for leaf in leaves[:num_pages - freed]:
                del leaf.parent.children[leaf.key]
                self.allocator.free([leaf.page])
                self.num_pages -= 1
                freed += 1
        return freed

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def reset(self) -> bool:
        """Drop every cached page; refuses (False) while any node is locked."""
        if any(n.ref for n in self._iter_nodes()):
            return False
        self.allocator.free([n.page for n in self._iter_nodes()])
        self.root = Node((), 0, None)
        self.num_pages = 0
        return True

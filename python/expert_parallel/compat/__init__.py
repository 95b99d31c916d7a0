"""Adapters that give other libraries' APIs over expert_parallel's groups.

``expert_parallel.compat.deep_ep``: DeepEP's ``Buffer`` (intranode and low-latency paths), so that a
model written against ``deep_ep.Buffer`` switches by changing one import
(docs/switching-from-deepep.md).
"""

"""The engine: the stock model's decoder layers run with a per-layer set of kept tokens.

Start with `decoder` (prefill, decode_step and the `Withdrawal(k)` selector: VTW in a few lines); `embed` builds
the prompt's embeddings and masks; `schedules` and `methods` hold the other token selectors (FastV, per-layer
schedules) and how a method name becomes one; `flops` is the cost of a call for a given selector;
`fast_decode`, `fast_prefill` and `shared_prefill` are faster paths with the same results; `query_attention`
recomputes a few rows' attention for FastV and the analysis.

May import: vtw_core.errors, vtw_core.validation, vtw_core.assets and vtw_core.models. Nothing above it.
"""

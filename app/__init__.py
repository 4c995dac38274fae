"""The Gradio front end of VTW Chat. It never touches tensors: everything goes through vtw_core.

Feature modules, plain functions without Gradio objects (testable without a browser): `session` (the chat's
state, tickets, Stop and Clear, device activity), `turns` (asking and answering turns), `media` (uploads,
videos, examples), `metrics` (tables, footers, labels), `benchmark`, `search` (Search K), `attention`,
`errors` (what a user reads when a request fails). The page itself is `app.ui`.
"""

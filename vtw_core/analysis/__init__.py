"""Studying a model under VTW: the K search of the paper's Algorithm 1 (`k_search`, with its calibration set
in `calibration`), the per-layer schedule search (`schedule_search`), where the last token's attention goes
(`attention`), and the formatting and plots of their results (`units`, `plots`).

May import: the engine, models and generation folders. Never imported by them.
"""

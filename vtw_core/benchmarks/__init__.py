"""Measuring speed and accuracy: `bench` (baseline and methods timed interleaved, medians with ranges, FLOPs
and memory), `stages` (the time to the first token split into the vision tower and the layer groups), and
`evaluate` (easy-vqa accuracy, and the K the paper's criterion picks on it).

May import: everything below it (engine, models, generation, analysis, training's easy-vqa data).
"""

"""What differs per model family: where the decoder and the vision tokens are (`families`), chat prompts
(`prompts`), processors (`processors`), image and video inputs (`images`, `videos`), the shipped configs of
public checkpoints (`configs/`) and the embedded default model's location (`defaults`).

A new family touches this folder and its tests, not the engine. May import: vtw_core.errors,
vtw_core.validation and vtw_core.assets.
"""

"""Training the embedded default model: the easy-vqa data (`easyvqa`) and the training run, started with
`python -m vtw_core.training.train_default` (the command) and built from `model` (architecture), `data`
(tokenizer, processor, sampling, packing), `loss`, `vision` (stage 1) and `loop` (stage 2, `train`).

Apart from the library: nothing in the engine, models, generation or serving imports it.
"""

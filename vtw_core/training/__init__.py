"""Training the embedded default model: the easy-vqa data (`easyvqa`) and the training run (`train_default`).

Apart from the library: nothing in the engine, models, generation or serving imports it.
"""

"""Tiny random-weight models of every supported family, built offline with working processors: the fixtures of
the tests and of CPU benchmarks, and the building blocks of the default model's architecture.

`tiny` is the public face (the builders, the families, the token layouts); the parts live beside it: `sizes`,
`tokenizers`, `templates`, `configs`, `processors` and `build`.

Apart from the library: nothing in the engine, models, generation or serving imports it.
"""

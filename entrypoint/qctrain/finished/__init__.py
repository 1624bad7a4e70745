"""The finished run: everything that takes a run folder that training wrote (its adapter, manifest and card) and
does something with it, from any folder: `load` (the run's base, resolved from here, with the adapter on top),
`generate` (replies, and the base's beside them), `merge` (a standalone model), `gguf_lora` (the adapter for
llama.cpp and Ollama). Nothing here needs the recipe file: the run folder holds what it needs."""

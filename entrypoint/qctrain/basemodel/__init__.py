"""The base model, read in one of two ways: `files` (its config, tokenizer and weight names from its small files,
no torch: what `check` and `validate` use, in a fraction of a second) and `load` (the model itself, with torch:
what `train` uses). `reference` names the base so that it resolves from any folder, and finds its license.
Nothing is imported here, so that importing `files` never brings torch in."""

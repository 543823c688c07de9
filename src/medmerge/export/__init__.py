"""Edge deployment: export to CTranslate2 / GGUF with a numeric agreement check, answer engines, local page.

medmerge.export.exporter    export_model(): convert → agreement check → atomic folder + manifest
medmerge.export.ct2         CTranslate2 conversion (with the tied-embedding guard)
medmerge.export.gguf        GGUF writer for Llama-architecture models
medmerge.export.agreement   greedy token match and mean |Δ log-prob| against PyTorch
medmerge.export.engines     answer engines (torch, ct2, llama.cpp) and token streaming
medmerge.export.answer      question checks and the safety notice
medmerge.export.serve       the local answer page (FastAPI, 127.0.0.1)
"""

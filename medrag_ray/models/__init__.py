"""Models, each with a tiny offline builder and a loader of real weights from a local directory.

* :mod:`.dual_encoder` -- CLIP-style retriever R_d and the router's image tower (open_clip; BiomedCLIP).
* :mod:`.router` -- domain classifier F(x_v): image tower + linear head over domains.
* :mod:`.tokenizer` -- byte-level BPE trained offline; LLaVA-1.5 prompt format; yes/no answer token ids.
* :mod:`.reader` -- LLaVA-style VLM + processor (tiny from a config; LLaVA-Med / Qwen2-VL from disk).
* :mod:`.common` -- the ``medrag_model.json`` card, weight files, device and dtype handling.

Submodules are imported explicitly (``from medrag_ray.models.reader import load_reader``) so that importing
this package stays cheap.
"""

"""sau-hub: scan and clean Stable Diffusion models on the Hugging Face Hub with the SAU engine.

Flow (both commands): parse ``ORG/MODEL[@REV]`` -> ``auth_check`` -> ``model_info(revision, securityStatus=True)``
(the revision is pinned to its commit sha from here on) -> the tree with the Hub's per-file security status ->
a download plan (only the files the model needs; ``.py`` files are never downloaded, pickles never loaded) ->
safetensors headers pre-checked by HTTP range requests -> ``snapshot_download`` of the plan at the pinned sha
-> every file validated by ``sau_core`` -> scan / clean -> model card -> one commit (a pull request on the
source, or a new repo).
"""

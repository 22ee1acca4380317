"""Small stand-ins for the Forge-family WebUIs, written from /work/shared/research/forge.md
(no Forge, reForge or ComfyUI code is copied).

* ``new_forge``: Forge's new ``backend/`` — ``FakeInitialModel`` until
  ``sd_models.forge_model_reload()``, ``ForgeObjects`` of ``UnetPatcher`` (``KModel`` with a
  ``predictor``) and ``CLIP`` (``cond_stage_model`` of ``IntegratedCLIP``-like wrappers), a
  shared ``LoraLoader`` that merges ``lora_patches`` into the weights with backups,
  ``backend.memory_management`` and the Lora extension's ``networks`` with its cache.
* ``reforge``: reForge ``main`` — an A1111-shaped model over ComfyUI-style patchers that
  back weights up per patcher and restore them when a clone is unloaded.

Both dress a deep copy of a tiny diffusers pipeline (``loraclr_ext.demo.tiny``) in the
host's layout, so a test can compare against ``StandaloneHost`` on the original pipeline.
"""

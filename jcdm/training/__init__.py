"""The trainer: `build()` (mesh, input, model, sharding, update), the jitted step, the training
loop, the sharded samplers and FID evaluation, and `--only_inference`.

This is the bridge between the method (`jcdm.ict`, `jcdm.models`) and the runtime
(`jcdm.runtime`, `jcdm.data`): it binds the pure math to Flax modules, parameters and a mesh.
"""

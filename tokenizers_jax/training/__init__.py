"""The training system shared by every model (see `loop.train_and_evaluate`).

  sharding    device mesh and logical-axis rules
  state       the TrainState pytree, created sharded
  optimizer   Adam, encoder freezing, fix_initial_norms, EMA
  checkpoint  orbax checkpoints, preemption, `load_for_inference`
  writer      JSON lines, TensorBoard, console line, image grids (process 0)
  loop        the jitted train step and the host loop
"""

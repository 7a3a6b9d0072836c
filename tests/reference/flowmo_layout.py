"""The key names and shapes of the released FlowMo checkpoints (spec 9's table, transcribed)."""


def spec_state_dict_shapes(ctx: int) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of flowmo_lo.pth / flowmo_hi.pth, written from spec 9's table."""
    shapes = {}
    for prefix, h, head_dim, depth, txt in (("encoder", 768, 64, 8, ctx),
                                            ("decoder", 1152, 96, 16, ctx + 1)):
        def linear(name, out, inp):
            shapes[f"{prefix}.{name}.weight"] = (out, inp)
            shapes[f"{prefix}.{name}.bias"] = (out,)
        linear("time_in.in_layer", h, 256)
        linear("time_in.out_layer", h, h)
        linear("img_in", h, 48)
        linear("txt_in", h, txt)
        for i in range(depth):
            for s in ("img", "txt"):
                block = f"double_blocks.{i}.{s}"
                linear(f"{block}_mod.lin", 6 * h, h)
                linear(f"{block}_attn.qkv", 3 * h, h)
                shapes[f"{prefix}.{block}_attn.norm.query_norm.scale"] = (head_dim,)
                shapes[f"{prefix}.{block}_attn.norm.key_norm.scale"] = (head_dim,)
                linear(f"{block}_attn.proj", h, h)
                linear(f"{block}_mlp.0", 4 * h, h)
                linear(f"{block}_mlp.2", h, 4 * h)
        for s, out in (("img", 48), ("txt", txt)):
            linear(f"final_layer_{s}.linear", out, h)
            linear(f"final_layer_{s}.adaLN_modulation.1", 2 * h, h)
    return shapes

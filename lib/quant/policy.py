"""Per-layer bit policies: {layer name: bits, or None for fp32}, built from list_quantizable's
LayerInfo list (forward order when it was given example inputs)."""


def uniform_policy(layers, bits):
    """Every layer at `bits` (None: all fp32)."""
    return {layer.name: bits for layer in layers}


def first_and_last(layers):
    """The names of the first and the last layer of `layers` that the forward calls (the input
    layer and the final classifier); none when it called none. list_quantizable puts the layers
    a forward never called after the others (input_size 0), so the last of `layers` would be
    such a layer (one defined beside the head and left unused), not the classifier."""
    called = [layer.name for layer in layers if layer.input_size > 0]
    return [called[0], called[-1]] if called else []


def keep_first_last(policy, layers, bits):
    """A copy of `policy` with first_and_last(layers) set to `bits`, an int or None for fp32:
    HAQ's mixed precision keeps them outside the search."""
    return {**policy, **dict.fromkeys(first_and_last(layers), bits)}

"""Per-layer bit policies: {layer name: bits, or None for fp32}, built from list_quantizable's
LayerInfo list (forward order when it was given example inputs)."""


def uniform_policy(layers, bits):
    """Every layer at `bits` (None: all fp32)."""
    return {layer.name: bits for layer in layers}


def keep_first_last(policy, layers, bits):
    """A copy of `policy` with the first and the last layer of `layers` (the input layer and the
    final classifier, in forward order) set to `bits`, an int or None for fp32: HAQ's mixed
    precision keeps them outside the search."""
    kept = dict(policy)
    if layers:
        kept[layers[0].name] = bits
        kept[layers[-1].name] = bits
    return kept

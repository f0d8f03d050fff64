"""Per-layer bit policies: {layer name: bits, or None for fp32}, built from list_quantizable's
LayerInfo list (forward order when it was given example inputs)."""
from lib.data import note


def uniform_policy(layers, bits):
    """Every layer at `bits` (None: all fp32)."""
    return {layer.name: bits for layer in layers}


def called_layers(layers, where=None):
    """The layers of `layers` that the forward calls, in its order: the ones HAQ searches and
    charges to its budget (bits given to a layer that changes no output are bits spent on
    nothing). list_quantizable gives a layer the forward never called input_size 0 (one defined
    beside the head and left unused); such a layer stays fp32, and with `where` (the script)
    one line says so."""
    for layer in layers:
        if layer.input_size == 0 and where:
            note(f"{where}: layer {layer.name} is never called by the forward; left in fp32")
    return [layer for layer in layers if layer.input_size > 0]


def first_and_last(layers):
    """The names of the first and the last layer of `layers` that the forward calls (the input
    layer and the final classifier); none when it called none. list_quantizable puts the layers
    a forward never called after the others, so the last of `layers` would be such a layer,
    not the classifier."""
    called = [layer.name for layer in called_layers(layers)]
    return [called[0], called[-1]] if called else []


def keep_first_last(policy, layers, bits):
    """A copy of `policy` with first_and_last(layers) set to `bits`, an int or None for fp32:
    HAQ's mixed precision keeps them outside the search."""
    return {**policy, **dict.fromkeys(first_and_last(layers), bits)}

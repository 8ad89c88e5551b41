"""Quantised base weights (QLoRA): the NF4 and int8 codecs, the ``QuantizedArray`` node, and
``quantize``/``dequantize`` over trees."""

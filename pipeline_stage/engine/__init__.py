"""The engine: TensorFlow, LiteRT and tfmot at work (loading the source model, the one conversion,
the LiteRT interpreter, the flatbuffer, the LiteRT Quantizer, the tf_keras bridge for tfmot).
Every heavy import happens inside a function, so importing a module here stays cheap."""

"""The instruction-dataset pipeline: read → normalize → validate → filter → dedup → label → split → augment →
balance → report. Each stage is a plain function over records; `pipeline.build` runs them in order."""

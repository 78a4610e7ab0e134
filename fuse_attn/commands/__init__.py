"""The commands, the top floor: `fuse-attn MODEL` and the dispatch to the others (`cli`),
`fuse-attn check` (`check`, one `check_worker` process per model, its table from `coverage`)
and the fuse options they share (`fuse_options`). They call the pipeline (`fuse_attn.pipeline`,
`fuse_attn.verify`, `fuse_attn.modelio`) and `fuse_attn.compile`; nothing below imports them."""

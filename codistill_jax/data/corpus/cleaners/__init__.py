"""The per-format text cleaners of the corpus: file bytes -> plain text.

One module per family of formats, each with the formats' rules and nothing
about sources or documents (the registry says which source uses which):

  plain        `tidy` and `decode`, which every cleaner ends and starts
               with; plain-text files
  markup       tags: HTML manuals, GNOME's Mallard XML, SWORD's OSIS
  lightweight  reStructuredText, POD, Vim help, AsciiDoc, Markdown
  multidoc     files that hold many documents (`read_*`: path -> their
               documents): dictd dictionaries, WordNet, SWORD modules

A `clean_*` takes a file's bytes and returns its prose: what a reader of the
rendered page sees, without markup, navigation or metadata.
"""

# Bump when a cleaner's output changes, so that caches of what was made from
# the texts (a tokenizer, encoded windows) keyed by it are not reused.
VERSION = 1

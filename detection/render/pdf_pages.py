"""A PDF of raster pages with an invisible text layer: each page is an RGB image drawn with OpenCV,
and every line of text drawn on it is also placed, invisible (render mode 3), where it was drawn,
so that the PDF can be searched, copied from and read by text extractors."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, PdfParser

from detection.render.labels import ascii_text

#: Helvetica's capital height per unit of font size: sizes the invisible text to the drawn capitals.
_CAP_HEIGHT = 0.718
#: Helvetica's mean advance per character and unit of font size (lower case text): the invisible
#: text is stretched horizontally (Tz) to about the drawn width with it.
_MEAN_ADVANCE = 0.5


@dataclass
class RasterPage:
    """pixels: uint8 (H, W, 3) RGB, drawn on in place. texts: (x, baseline y, capital height,
    drawn width, text) in the page's pixels, origin top-left, one per `put_text` call."""

    pixels: np.ndarray
    texts: list[tuple[int, int, int, int, str]] = field(default_factory=list)

    def put_text(self, text: str, origin: tuple[int, int], scale: float, color: tuple[int, int, int],
                 word: bool = False) -> int:
        """Draw `text` (made ASCII) with Hershey simplex at `origin` (x, baseline y) and record it for
        the text layer (word: followed there by a space, for a word drawn apart from the next one);
        returns the drawn width in pixels."""
        text = ascii_text(text)
        (width, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.putText(self.pixels, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
        if text.strip():
            self.texts.append((int(origin[0]), int(origin[1]), int(height), int(width), text + " " * word))
        return int(width)


def _escape(text: str) -> bytes:
    return text.encode("ascii", "replace").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _contents(page: RasterPage, points_per_pixel: float) -> bytes:
    height, width = page.pixels.shape[:2]
    parts = [b"q %f 0 0 %f 0 0 cm /image Do Q\n" % (width * points_per_pixel, height * points_per_pixel)]
    for x, baseline, cap_height, drawn, text in page.texts:
        size = max(1.0, cap_height / _CAP_HEIGHT) * points_per_pixel
        stretch = 100.0 * drawn * points_per_pixel / max(1e-6, _MEAN_ADVANCE * size * len(text))
        parts.append(b"BT 3 Tr /F1 %.2f Tf %.1f Tz 1 0 0 1 %.2f %.2f Tm (%s) Tj ET\n" % (
            size, stretch, x * points_per_pixel, (height - baseline) * points_per_pixel, _escape(text)))
    return b"".join(parts)


def pdf_bytes(pages: list[RasterPage], title: str, dpi: float) -> bytes:
    """The PDF of `pages` (JPEG images, as Pillow's PDF writer stores RGB pages) at `dpi`, each with
    its invisible text; no dates, so the same pages give the same bytes."""
    buffer = io.BytesIO()
    pdf = PdfParser.PdfParser(f=buffer, mode="w+b")
    pdf.info[b"Title"] = ascii_text(title)
    pdf.start_writing()
    pdf.write_header()
    page_refs = [pdf.next_object_id(0) for _ in pages]
    content_refs = [pdf.next_object_id(0) for _ in pages]
    pdf.pages.extend(page_refs)
    pdf.write_catalog()
    font = pdf.write_obj(None, Type=PdfParser.PdfName("Font"), Subtype=PdfParser.PdfName("Type1"),
                         BaseFont=PdfParser.PdfName("Helvetica"), Encoding=PdfParser.PdfName("WinAnsiEncoding"))
    points_per_pixel = 72.0 / dpi
    for page, page_ref, content_ref in zip(pages, page_refs, content_refs):
        height, width = page.pixels.shape[:2]
        jpeg = io.BytesIO()
        Image.fromarray(page.pixels).save(jpeg, "JPEG")
        image = pdf.write_obj(None, stream=jpeg.getvalue(), Type=PdfParser.PdfName("XObject"),
                              Subtype=PdfParser.PdfName("Image"), Width=width, Height=height,
                              Filter=PdfParser.PdfName("DCTDecode"), BitsPerComponent=8,
                              ColorSpace=PdfParser.PdfName("DeviceRGB"))
        pdf.write_page(page_ref, Resources=PdfParser.PdfDict(
                           ProcSet=[PdfParser.PdfName("PDF"), PdfParser.PdfName("Text"), PdfParser.PdfName("ImageC")],
                           XObject=PdfParser.PdfDict(image=image), Font=PdfParser.PdfDict(F1=font)),
                       MediaBox=[0, 0, width * points_per_pixel, height * points_per_pixel], Contents=content_ref)
        pdf.write_obj(content_ref, stream=_contents(page, points_per_pixel))
    pdf.write_xref_and_trailer()
    data = buffer.getvalue()
    pdf.close()
    return data

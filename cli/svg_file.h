// What the SVG pictures of `estimate --plot` and `recommend --plot` share: text escaping, and writing the SVG as
// it is or in an HTML page, chosen by the file's extension.
#pragma once

#include <cstdint>
#include <string>

namespace llmem::cli {

// A round step in bytes for about five axis ticks up to `top`: 1, 2, 5, 10, ... times a binary unit.
int64_t ByteTickStep(int64_t top);

// The opening of a picture: the <svg> element `width` x `height` pixels with the pictures' font, a white
// background, and the title in bold at (x, y). The caller closes it with "</svg>".
std::string SvgOpen(int width, int height, const std::string& title, int title_x, int title_y);

// `text` as SVG / HTML character data or an attribute value.
std::string SvgEscape(const std::string& text);

// Writes `svg` to an .svg file, or in a self-contained page titled `title` to an .html / .htm one; throws
// ConfigError naming `flag` for another extension, and for a file that cannot be written.
void WriteSvgOrHtml(const std::string& path, const std::string& svg, const std::string& title, const char* flag);

}  // namespace llmem::cli

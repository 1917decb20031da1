#include "cli/svg_file.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string_view>

#include "graph/error.h"

namespace llmem::cli {

int64_t ByteTickStep(int64_t top) {
  const double raw = static_cast<double>(std::max<int64_t>(top, 1)) / 5.0;
  const double unit = std::pow(1024.0, std::floor(std::log(raw) / std::log(1024.0)));
  for (const double m : {1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0}) {
    if (unit * m >= raw) return std::max<int64_t>(1, static_cast<int64_t>(unit * m));
  }
  return static_cast<int64_t>(unit * 1000.0);
}

std::string SvgEscape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string SvgOpen(int width, int height, const std::string& title, int title_x, int title_y) {
  const std::string w = std::to_string(width), h = std::to_string(height);
  return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + w + "\" height=\"" + h + "\" viewBox=\"0 0 " + w +
         " " + h + "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
         "fill=\"#ffffff\"/>\n<text x=\"" + std::to_string(title_x) + "\" y=\"" + std::to_string(title_y) +
         "\" font-size=\"15\" font-weight=\"bold\">" + SvgEscape(title) + "</text>\n";
}

void WriteSvgOrHtml(const std::string& path, const std::string& svg, const std::string& title, const char* flag) {
  const auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  const bool html = ends_with(".html") || ends_with(".htm");
  if (!html && !ends_with(".svg")) throw ConfigError(std::string(flag) + " writes an .svg or .html file, not " + path);
  std::ofstream out(path, std::ios::binary);
  if (!out) throw ConfigError("cannot write the plot file " + path);
  if (html) {
    out << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" << SvgEscape(title)
        << "</title></head>\n<body style=\"margin:0;background:#fff\">\n" << svg << "</body></html>\n";
  } else {
    out << svg;
  }
  if (!out) throw ConfigError("cannot write the plot file " + path);
}

}  // namespace llmem::cli

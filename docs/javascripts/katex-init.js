// Typeset the math that pymdownx.arithmatex (generic: true) leaves in the page:
// <span class="arithmatex">\(...\)</span> inline, <div class="arithmatex">\[...\]</div>
// for display math. KaTeX is vendored in docs/vendor/katex (no CDN).
(function () {
  "use strict";

  function strip(tex) {
    if (tex.startsWith("\\(") && tex.endsWith("\\)")) return [tex.slice(2, -2), false];
    if (tex.startsWith("\\[") && tex.endsWith("\\]")) return [tex.slice(2, -2), true];
    return [tex, null];
  }

  function typeset() {
    document.querySelectorAll(".arithmatex").forEach(function (el) {
      if (el.dataset.katex) return; // already typeset (instant navigation)
      var parts = strip(el.textContent.trim());
      var display = parts[1] === null ? el.tagName === "DIV" : parts[1];
      katex.render(parts[0], el, { displayMode: display, throwOnError: false });
      el.dataset.katex = "1";
    });
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(typeset); // Material's page-load observable
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", typeset);
  } else {
    typeset();
  }
})();

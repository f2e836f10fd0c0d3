// The menu (chapter list) and "Contents" buttons of the pinned theme pair (pydata-sphinx-theme 0.17.1 under
// sphinx-book-theme 1.3.0; upstream: pydata/pydata-sphinx-theme#2451). Both themes render a `.primary-toggle` and
// a `.secondary-toggle` button, but the themes' scripts bind their click handlers to the first of each only
// (`document.querySelector`). The visible one, on a phone and on a desktop, is the other: it did nothing.
// Here a click on any other button of the same kind is handed to the first one, whose handlers open the pop-up
// panel on a narrow screen and collapse the sidebar on a wide one.
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of ["primary-toggle", "secondary-toggle"]) {
    const [first, ...others] = document.querySelectorAll(`button.${kind}`);
    for (const button of others) {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        button.blur();
        first.click();
      });
    }
  }
});

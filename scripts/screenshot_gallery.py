"""Screenshot a review page in headless Chromium (for docs/): `python scripts/screenshot_gallery.py PAGE OUT.png`."""

import argparse
from pathlib import Path

from selenium.webdriver.support.ui import Select, WebDriverWait

from align_diffusion.gallery.browser import headless_chromium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("page", type=Path, help="an index.html or compare-*.html")
    parser.add_argument("out", type=Path, help="PNG file")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900, help="window height (the part of the page captured)")
    parser.add_argument("--sort", default=None, help="sort menu option to pick first, e.g. 'Δ shapes ↓'")
    args = parser.parse_args()
    if not args.page.is_file():
        parser.error(f"no such page {args.page}")
    browser = headless_chromium(width=args.width, height=args.height)
    try:
        browser.get(args.page.resolve().as_uri())
        # Label buttons stay disabled (greyed) until the page's stored labels have loaded.
        WebDriverWait(browser, 10).until(lambda b: b.execute_script(
            "return !document.querySelector('button[data-label]') || document.body.dataset.labels"))
        if args.sort:
            menu = Select(browser.find_element("id", "sort"))
            options = [option.text for option in menu.options]
            if args.sort not in options:
                parser.error(f"--sort: the page sorts by {options}, not {args.sort!r}")
            menu.select_by_visible_text(args.sort)
        browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
        browser.execute_script("return Promise.all(Array.from(document.images).map(i => i.decode().catch(() => 0)))")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.out))
    finally:
        browser.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

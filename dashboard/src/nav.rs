//! Pages under `/ui/`, each with a deep link: the address is the state, so a link, a
//! reload and the browser's back and forward buttons all land on the same page.

use sycamore::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::App;

/// The app's sections, in the order the navigation lists them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Section {
    Orders,
    Runs,
    Plugins,
    DeadLetters,
    Health,
}

impl Section {
    pub const ALL: [Section; 5] =
        [Section::Orders, Section::Runs, Section::Plugins, Section::DeadLetters, Section::Health];

    /// The path segment after `/ui/`.
    pub fn slug(self) -> &'static str {
        match self {
            Section::Orders => "orders",
            Section::Runs => "runs",
            Section::Plugins => "plugins",
            Section::DeadLetters => "dead-letters",
            Section::Health => "health",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Section::Orders => "Orders",
            Section::Runs => "Runs",
            Section::Plugins => "Plugins",
            Section::DeadLetters => "Dead letters",
            Section::Health => "Health",
        }
    }
}

/// Where the app is: a section, and for orders and runs the one open (`/ui/orders/{id}`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Page {
    pub section: Section,
    pub id: Option<String>,
}

impl Page {
    pub fn of(section: Section) -> Self {
        Page { section, id: None }
    }

    /// The page a path names; `/`, `/ui` and unknown paths are the orders.
    pub fn parse(path: &str) -> Self {
        let mut parts = path.trim_start_matches('/').split('/').filter(|s| !s.is_empty());
        if parts.next() != Some("ui") {
            return Page::of(Section::Orders);
        }
        let section = parts.next().and_then(|s| Section::ALL.into_iter().find(|x| x.slug() == s));
        let Some(section) = section else { return Page::of(Section::Orders) };
        let id = parts
            .next()
            .filter(|_| matches!(section, Section::Orders | Section::Runs))
            .map(|s| js_sys::decode_uri_component(s).map(String::from).unwrap_or_else(|_| s.to_string()));
        Page { section, id }
    }

    pub fn path(&self) -> String {
        match &self.id {
            Some(id) => format!("/ui/{}/{}", self.section.slug(), crate::api::enc(id)),
            None => format!("/ui/{}", self.section.slug()),
        }
    }
}

fn location_path() -> String {
    web_sys::window().and_then(|w| w.location().pathname().ok()).unwrap_or_default()
}

fn history(push: bool, path: &str) {
    let Some(h) = web_sys::window().and_then(|w| w.history().ok()) else { return };
    let _ = if push {
        h.push_state_with_url(&JsValue::NULL, "", Some(path))
    } else {
        h.replace_state_with_url(&JsValue::NULL, "", Some(path))
    };
}

/// Lands on the page the address names, follows back and forward, and keeps the
/// address in step with the order drawer.
pub fn start(app: App) {
    let page = Page::parse(&location_path());
    // `/` opens `/ui/orders`; an unknown path says where it landed.
    history(false, &page.path());
    arrive(app, page);
    let on_pop = Closure::<dyn FnMut()>::new(move || arrive(app, Page::parse(&location_path())));
    if let Some(w) = web_sys::window() {
        let _ = w.add_event_listener_with_callback("popstate", on_pop.as_ref().unchecked_ref());
    }
    on_pop.forget();
    // A row clicked or the drawer closed (Escape) is a new page of its own.
    create_effect(move || {
        let selected = app.detail.selected.get_clone();
        let page = app.page.get_clone_untracked();
        if page.section == Section::Orders && page.id != selected {
            go(app, Page { section: Section::Orders, id: selected });
        }
    });
}

/// Goes to `page`, as a new entry in the browser's history.
pub fn go(app: App, page: Page) {
    if page.path() != location_path() {
        history(true, &page.path());
    }
    arrive(app, page);
}

/// Shows `page`: the page first, so the drawer's change below reads as already there.
fn arrive(app: App, page: Page) {
    app.page.set(page.clone());
    if let Some(d) = web_sys::window().and_then(|w| w.document()) {
        d.set_title(&format!("{} · Atomic Order Orchestrator", page.section.title()));
    }
    if page.section == Section::Orders {
        crate::orders::restore_scroll(app);
    }
    let open = app.detail.selected.get_clone_untracked();
    match (page.section, page.id) {
        (Section::Orders, id) if id != open => {
            // Unsaved edits keep their order open (it says why), and the address with it.
            if crate::detail::holds_edits(app) {
                let stay = Page { section: Section::Orders, id: open };
                history(false, &stay.path());
                return app.page.set(stay);
            }
            match id {
                Some(id) => crate::detail::select(app, id),
                None => crate::detail::close(app),
            }
        }
        (Section::Runs, id) => crate::runs::show(app, id),
        // Its figures (calls, shadow differences) move while it is not shown.
        (Section::Plugins, _) => crate::plugins::refresh(app),
        _ => {}
    }
}

/// A link's click: a plain one changes the page here; others (a new tab) are the browser's.
pub fn click(app: App, page: Page) -> impl Fn(web_sys::MouseEvent) + 'static {
    move |e| {
        if e.button() == 0 && !(e.ctrl_key() || e.meta_key() || e.shift_key() || e.alt_key()) {
            e.prevent_default();
            go(app, page.clone());
        }
    }
}

/// The navigation bar: links that work as links (a new tab, a copied address) and,
/// clicked plainly, change the page without a reload.
pub fn view(app: App) -> View {
    let links: Vec<View> = Section::ALL
        .into_iter()
        .map(|s| {
            let current = move || app.page.with(|p| p.section == s);
            let aria = move || if current() { "page" } else { "false" };
            let class = move || if current() { "nav-link current" } else { "nav-link" };
            let on_click = click(app, Page::of(s));
            let testid = format!("nav-{}", s.slug());
            let href = Page::of(s).path();
            view! {
                a(href=href, class=class, aria-current=aria, data-testid=testid, on:click=on_click) { (s.title()) }
            }
        })
        .collect();
    view! { nav(class="pages", aria-label="pages") { (links) } }
}

/// Calls `f` now, then every `ms` while `section` is the page shown: figures that have no
/// push channel, asked for only where someone looks at them.
pub fn every_while_shown(app: App, section: Section, ms: i32, f: impl Fn() + 'static) {
    f();
    let tick = move || {
        if app.page.with_untracked(|p| p.section == section) {
            f();
        }
    };
    let cb = wasm_bindgen::closure::Closure::<dyn FnMut()>::new(tick);
    if let Some(w) = web_sys::window() {
        let _ = w.set_interval_with_callback_and_timeout_and_arguments_0(
            wasm_bindgen::JsCast::unchecked_ref(cb.as_ref()),
            ms,
        );
    }
    cb.forget();
}

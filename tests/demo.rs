//! Evaluation of the bundled demo model (weights/demo) through the library's real code path:
//! the files embedded in the library are extracted, loaded like any local model, and a fixed
//! list of prompts is drawn with fixed seeds at the model's defaults (size, scheduler) and
//! `latent generate`'s defaults (30 steps, guidance 7.5). Each image is then checked by
//! measurement: the background colour (median of the border), the shape's colour (mean of the
//! largest region of pixels that differ from the background), its class (mask moments and
//! the overlap with a same-area square and circle), and position and size where the prompt
//! names them.
//!
//! tools/train_demo.py holds the same prompts, seeds, palette and rules, and prints the same
//! scores for its own run through diffusers.
use candle_core::{DType, Device};
use latent::model::ModelSource;
use latent::noise::RngKind;
use latent::pipeline::{PromptEmbeddings, Sampling, StableDiffusion, Timings};

/// The palette the training images were drawn with (`COLORS` in tools/train_demo.py).
const COLORS: [(&str, [f64; 3]); 6] = [
    ("red", [220.0, 40.0, 40.0]),
    ("yellow", [240.0, 210.0, 40.0]),
    ("green", [40.0, 160.0, 60.0]),
    ("blue", [40.0, 80.0, 220.0]),
    ("white", [240.0, 240.0, 240.0]),
    ("black", [25.0, 25.0, 25.0]),
];

/// A pixel belongs to the shape when it is this far (RGB Euclidean) from the background.
const MASK_DISTANCE: f64 = 60.0;
/// Fewer shape pixels than this: no shape found.
const MIN_AREA: usize = 12;
/// Prompt i of TRAINED then HELD_OUT is drawn with seed EVAL_SEED + i.
const EVAL_SEED: u64 = 1000;
/// Share of the trained prompts that must come out entirely right (shape and background
/// colour, shape class, and position and size where the prompt names them).
const REQUIRED: f64 = 0.9;

/// What a prompt asks for: (prompt, shape, colour, background, position, size).
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

/// Prompts whose (shape, colour, background) combination was in the training data.
const TRAINED: &[Case] = &[
    (
        "a red circle on a blue background",
        "circle",
        "red",
        "blue",
        None,
        None,
    ),
    (
        "a yellow square on a black background",
        "square",
        "yellow",
        "black",
        None,
        None,
    ),
    (
        "a green triangle on a white background",
        "triangle",
        "green",
        "white",
        None,
        None,
    ),
    (
        "a white star on a blue background",
        "star",
        "white",
        "blue",
        None,
        None,
    ),
    (
        "a blue circle on a yellow background",
        "circle",
        "blue",
        "yellow",
        None,
        None,
    ),
    (
        "a black square on a green background",
        "square",
        "black",
        "green",
        None,
        None,
    ),
    (
        "a red triangle on a black background",
        "triangle",
        "red",
        "black",
        None,
        None,
    ),
    (
        "a yellow star on a red background",
        "star",
        "yellow",
        "red",
        None,
        None,
    ),
    (
        "a black circle on a white background",
        "circle",
        "black",
        "white",
        None,
        None,
    ),
    (
        "a green square on a red background",
        "square",
        "green",
        "red",
        None,
        None,
    ),
    (
        "a blue star on a white background",
        "star",
        "blue",
        "white",
        None,
        None,
    ),
    (
        "a white triangle on a black background",
        "triangle",
        "white",
        "black",
        None,
        None,
    ),
    (
        "a small red circle on the left, on a blue background",
        "circle",
        "red",
        "blue",
        Some("left"),
        Some("small"),
    ),
    (
        "a large white square on a green background",
        "square",
        "white",
        "green",
        None,
        Some("large"),
    ),
    (
        "a blue triangle at the top, on a yellow background",
        "triangle",
        "blue",
        "yellow",
        Some("top"),
        None,
    ),
    (
        "a green star on the right, on a black background",
        "star",
        "green",
        "black",
        Some("right"),
        None,
    ),
    (
        "yellow circle at the bottom, white background",
        "circle",
        "yellow",
        "white",
        Some("bottom"),
        None,
    ),
    (
        "a red background with a white square",
        "square",
        "white",
        "red",
        None,
        None,
    ),
    (
        "a black background with a large yellow triangle",
        "triangle",
        "yellow",
        "black",
        None,
        Some("large"),
    ),
    (
        "a blue background with a green circle",
        "circle",
        "green",
        "blue",
        None,
        None,
    ),
];

/// Prompts whose (shape, colour, background) combination was held out of training.
const HELD_OUT: &[Case] = &[
    (
        "a green circle on a white background",
        "circle",
        "green",
        "white",
        None,
        None,
    ),
    (
        "a yellow circle on a black background",
        "circle",
        "yellow",
        "black",
        None,
        None,
    ),
    (
        "a red square on a white background",
        "square",
        "red",
        "white",
        None,
        None,
    ),
    (
        "a blue square on a yellow background",
        "square",
        "blue",
        "yellow",
        None,
        None,
    ),
    (
        "a blue triangle on a green background",
        "triangle",
        "blue",
        "green",
        None,
        None,
    ),
    (
        "a white triangle on a red background",
        "triangle",
        "white",
        "red",
        None,
        None,
    ),
    (
        "a yellow star on a blue background",
        "star",
        "yellow",
        "blue",
        None,
        None,
    ),
    (
        "a black star on a green background",
        "star",
        "black",
        "green",
        None,
        None,
    ),
];

/// What the checker sees in one image.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    background: &'static str,
    /// `None` when no shape stands out from the background.
    shape: Option<ShapeSeen>,
}

#[derive(Debug, Clone, PartialEq)]
struct ShapeSeen {
    color: &'static str,
    class: &'static str,
    position: &'static str,
    size: &'static str,
    extent: f64,
    top: f64,
    /// Overlap (intersection over union) with a square and with a circle of the same area and
    /// centroid.
    square_fit: f64,
    circle_fit: f64,
}

fn nearest_color(rgb: [f64; 3]) -> &'static str {
    let mut best = (f64::INFINITY, COLORS[0].0);
    for (name, c) in COLORS {
        let d: f64 = (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum();
        if d < best.0 {
            best = (d, name);
        }
    }
    best.1
}

/// The median of the values, averaging the middle two for an even count (as numpy does).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Shape class from the mask's extent (area over bounding box), the share of its area in the
/// upper half of the box, and its overlap with a square and a circle of its own area and
/// centroid: a point-up triangle has 1/4 of its area in the upper half, the thin-armed star
/// fills ~0.4 of its box, and a square or circle overlaps its own template by ~1 and the other
/// by ~0.83. The templates, unlike the box, do not stretch with a bump on an edge.
fn classify(extent: f64, top: f64, square_fit: f64, circle_fit: f64) -> &'static str {
    if top < 0.38 {
        "triangle"
    } else if extent <= 0.6 {
        "star"
    } else if square_fit > circle_fit {
        "square"
    } else {
        "circle"
    }
}

/// Intersection over union of the region with an axis-aligned square and with a circle of the
/// same area, both centred on the region's centroid (pixel centres at +0.5).
fn template_fits(points: &[(usize, usize)], w: usize, h: usize) -> (f64, f64) {
    let area = points.len() as f64;
    let cx = points.iter().map(|p| p.0 as f64 + 0.5).sum::<f64>() / area;
    let cy = points.iter().map(|p| p.1 as f64 + 0.5).sum::<f64>() / area;
    let half = area.sqrt() / 2.0;
    let r2 = area / std::f64::consts::PI;
    let in_square = |x: f64, y: f64| (x - cx).abs() <= half && (y - cy).abs() <= half;
    let in_circle = |x: f64, y: f64| (x - cx).powi(2) + (y - cy).powi(2) <= r2;
    let fit = |inside: &dyn Fn(f64, f64) -> bool| {
        let template = (0..w * h)
            .filter(|i| inside((i % w) as f64 + 0.5, (i / w) as f64 + 0.5))
            .count() as f64;
        let both = points
            .iter()
            .filter(|p| inside(p.0 as f64 + 0.5, p.1 as f64 + 0.5))
            .count() as f64;
        both / (area + template - both)
    };
    (fit(&in_square), fit(&in_circle))
}

/// Position class of the bounding box's centre (not the centroid: a triangle's sits low).
fn position_of(cx: f64, cy: f64, side: f64) -> &'static str {
    let (dx, dy) = (cx - side / 2.0, cy - side / 2.0);
    if dx.abs().max(dy.abs()) < 5.0 {
        "center"
    } else if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            "left"
        } else {
            "right"
        }
    } else if dy < 0.0 {
        "top"
    } else {
        "bottom"
    }
}

/// Size class of half the bounding box's longer side (drawn radii: 10, 14, 18 pixels).
fn size_of(radius: f64) -> &'static str {
    if radius < 12.0 {
        "small"
    } else if radius > 16.5 {
        "large"
    } else {
        "medium"
    }
}

/// The largest 8-connected region of a mask (row-major, `w` wide), the first in row-major
/// order on a tie: the shape, without the specks a decoder leaves elsewhere (a stray pixel in
/// a corner would otherwise stretch the bounding box over the whole picture). Returns the
/// region's pixels as (x, y).
fn largest_component(mask: &[bool], w: usize, h: usize) -> Vec<(usize, usize)> {
    let mut seen = vec![false; mask.len()];
    let mut best: Vec<(usize, usize)> = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut region = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            region.push((x, y));
            for v in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for u in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = v * w + u;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if region.len() > best.len() {
            best = region;
        }
    }
    best
}

/// Measures an HxWx3 image (row-major bytes).
fn measure(rgb: &[u8], w: usize, h: usize) -> Seen {
    let px = |x: usize, y: usize| -> [f64; 3] {
        let i = 3 * (y * w + x);
        [rgb[i] as f64, rgb[i + 1] as f64, rgb[i + 2] as f64]
    };
    // The border as numpy's concatenate([img[0], img[-1], img[:, 0], img[:, -1]]) lists it.
    let mut border = Vec::with_capacity(2 * (w + h));
    border.extend((0..w).map(|x| px(x, 0)));
    border.extend((0..w).map(|x| px(x, h - 1)));
    border.extend((0..h).map(|y| px(0, y)));
    border.extend((0..h).map(|y| px(w - 1, y)));
    let bg: [f64; 3] =
        std::array::from_fn(|c| median(border.iter().map(|p| p[c]).collect::<Vec<_>>()));
    let background = nearest_color(bg);

    let mask: Vec<bool> = (0..w * h)
        .map(|i| {
            let p = px(i % w, i / w);
            (0..3).map(|c| (p[c] - bg[c]).powi(2)).sum::<f64>().sqrt() > MASK_DISTANCE
        })
        .collect();
    let points = largest_component(&mask, w, h);
    let mut sum = [0.0f64; 3];
    for &(x, y) in &points {
        let p = px(x, y);
        for c in 0..3 {
            sum[c] += p[c];
        }
    }
    let area = points.len();
    if area < MIN_AREA {
        return Seen {
            background,
            shape: None,
        };
    }
    let x0 = points.iter().map(|p| p.0).min().unwrap_or(0);
    let x1 = points.iter().map(|p| p.0).max().unwrap_or(0);
    let y0 = points.iter().map(|p| p.1).min().unwrap_or(0);
    let y1 = points.iter().map(|p| p.1).max().unwrap_or(0);
    let (bw, bh) = ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64);
    let extent = area as f64 / (bw * bh);
    let upper = points
        .iter()
        .filter(|p| (p.1 as f64) < y0 as f64 + bh / 2.0)
        .count();
    let top = upper as f64 / area as f64;
    let mean = sum.map(|s| s / area as f64);
    let cx = (x0 + x1 + 1) as f64 / 2.0;
    let cy = (y0 + y1 + 1) as f64 / 2.0;
    let (square_fit, circle_fit) = template_fits(&points, w, h);
    Seen {
        background,
        shape: Some(ShapeSeen {
            color: nearest_color(mean),
            class: classify(extent, top, square_fit, circle_fit),
            position: position_of(cx, cy, w as f64),
            size: size_of(bw.max(bh) / 2.0),
            extent,
            top,
            square_fit,
            circle_fit,
        }),
    }
}

/// Which of the prompt's statements the image fails ("background", "color", ...); empty when
/// it shows everything the prompt says.
fn failures(case: &Case, seen: &Seen) -> Vec<&'static str> {
    let (_, shape, color, background, position, size) = *case;
    let mut failed = Vec::new();
    if seen.background != background {
        failed.push("background");
    }
    match &seen.shape {
        None => failed.push("no shape"),
        Some(s) => {
            if s.color != color {
                failed.push("color");
            }
            if s.class != shape {
                failed.push("shape");
            }
            if position.is_some_and(|p| p != s.position) {
                failed.push("position");
            }
            if size.is_some_and(|z| z != s.size) {
                failed.push("size");
            }
        }
    }
    failed
}

/// Draws the synthetic picture a case describes (flat colours, like the training data) so the
/// checker can be tested on images with a known answer.
fn draw(shape: &str, color: &str, background: &str, cx: f64, cy: f64, r: f64) -> Vec<u8> {
    let rgb = |name: &str| COLORS.iter().find(|c| c.0 == name).map(|c| c.1).unwrap();
    let (fg, bg) = (rgb(color), rgb(background));
    let side = 64;
    let inside = |x: f64, y: f64| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match shape {
            "circle" => dx * dx + dy * dy <= r * r,
            "square" => dx.abs() <= r && dy.abs() <= r,
            // Point up, apex at cy - r, base at cy + r.
            "triangle" => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
            "star" => {
                // A point-up 5-point star (inner radius 0.4 r), tested by polygon winding.
                let top = -1.0;
                let bottom = (std::f64::consts::PI / 5.0).cos();
                let oy = cy - r * (top + bottom) / 2.0;
                let pts: Vec<(f64, f64)> = (0..10)
                    .map(|k| {
                        let a =
                            -std::f64::consts::FRAC_PI_2 + k as f64 * std::f64::consts::PI / 5.0;
                        let rr = if k % 2 == 0 { r } else { 0.4 * r };
                        (cx + rr * a.cos(), oy + rr * a.sin())
                    })
                    .collect();
                let mut inside = false;
                for i in 0..pts.len() {
                    let (a, b) = (pts[i], pts[(i + 1) % pts.len()]);
                    if (a.1 > y) != (b.1 > y) && x < a.0 + (y - a.1) / (b.1 - a.1) * (b.0 - a.0) {
                        inside = !inside;
                    }
                }
                inside
            }
            _ => false,
        }
    };
    let mut out = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            let c = if inside(x as f64 + 0.5, y as f64 + 0.5) {
                fg
            } else {
                bg
            };
            out.extend(c.map(|v| v as u8));
        }
    }
    out
}

#[test]
fn checker_reads_drawn_pictures() {
    let cases = [
        (
            "circle", "red", "blue", 32.0, 32.0, 14.0, "center", "medium",
        ),
        (
            "square", "yellow", "black", 18.0, 32.0, 10.0, "left", "small",
        ),
        (
            "triangle", "green", "white", 32.0, 22.0, 10.0, "top", "small",
        ),
        ("star", "white", "blue", 44.0, 32.0, 19.0, "right", "large"),
        (
            "star", "black", "green", 32.0, 42.0, 14.0, "bottom", "medium",
        ),
        (
            "circle", "blue", "yellow", 32.0, 32.0, 19.0, "center", "large",
        ),
    ];
    for (shape, color, bg, cx, cy, r, position, size) in cases {
        let seen = measure(&draw(shape, color, bg, cx, cy, r), 64, 64);
        let s = seen.shape.as_ref().expect("a shape");
        assert_eq!(
            (seen.background, s.color, s.class, s.position, s.size),
            (bg, color, shape, position, size),
            "{shape} {color} on {bg} at ({cx}, {cy}) r {r}: {seen:?}"
        );
    }
    // A speck far from the shape (as a decoder may leave) does not change the reading: the
    // shape is the largest region that stands out.
    let mut specked = draw("triangle", "white", "black", 44.0, 32.0, 10.0);
    for (x, y) in [(3, 3), (4, 3), (3, 4), (4, 4)] {
        specked[3 * (y * 64 + x)..3 * (y * 64 + x) + 3].copy_from_slice(&[240, 240, 240]);
    }
    let seen = measure(&specked, 64, 64);
    let s = seen.shape.as_ref().expect("a shape");
    assert_eq!(
        (s.class, s.position, s.size),
        ("triangle", "right", "small"),
        "{seen:?}"
    );
    // A bump on an edge (as a decoder may leave) stretches the bounding box, so the share of
    // the box filled drops to that of a rounded shape, but the class holds: it comes from the
    // overlap with a square and a circle of the shape's own area and centroid.
    let paint = |img: &mut Vec<u8>, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>| {
        for y in ys {
            for x in xs.clone() {
                img[3 * (y * 64 + x)..3 * (y * 64 + x) + 3].copy_from_slice(&[240, 210, 40]);
            }
        }
    };
    let mut bumped = draw("square", "yellow", "black", 32.0, 32.0, 10.0);
    paint(&mut bumped, 34..40, 18..22);
    let seen = measure(&bumped, 64, 64);
    let s = seen.shape.as_ref().expect("a shape");
    assert!(s.extent < 0.9, "{seen:?}");
    assert_eq!((s.class, s.position), ("square", "center"), "{seen:?}");
    let mut bumped = draw("circle", "yellow", "black", 32.0, 32.0, 14.0);
    paint(&mut bumped, 45..49, 29..35);
    let seen = measure(&bumped, 64, 64);
    assert_eq!(
        seen.shape.as_ref().map(|s| s.class),
        Some("circle"),
        "{seen:?}"
    );
    // A plain picture has no shape, and the case fails for that reason.
    let plain = vec![40u8; 64 * 64 * 3];
    let seen = measure(&plain, 64, 64);
    assert_eq!(seen.shape, None);
    assert_eq!(failures(&TRAINED[0], &seen), vec!["background", "no shape"]);
}

/// Extracts the demo model embedded in the library into a temporary cache folder (the path
/// `latent` takes without --model) and loads it; the folder lives as long as the model.
fn load_demo() -> (tempfile::TempDir, StableDiffusion) {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = latent::demo::extract(root.path()).expect("extract the demo model");
    let files = ModelSource::parse(&dir.display().to_string(), None)
        .and_then(|s| s.open())
        .expect("open the demo model");
    let model = StableDiffusion::load(&files, &Device::Cpu, DType::F32, &mut |_| {})
        .expect("load the demo model");
    (root, model)
}

/// How many images of a list show what their prompt says.
#[derive(Debug, Default, Clone, Copy)]
struct Score {
    /// Every statement of the prompt (colours, shape class, position and size when named).
    all: usize,
    /// Background colour and shape colour.
    colors: usize,
    /// Shape class.
    shape: usize,
    total: usize,
}

/// Draws every case in one batch (one prompt embedding and one seed per image) and checks
/// each image, printing each verdict.
fn score(model: &StableDiffusion, label: &str, cases: &[Case], first_seed: u64) -> Score {
    let sampling = Sampling {
        width: model.default_size(),
        height: model.default_size(),
        steps: 30,
        guidance: 7.5,
        scheduler: model
            .default_scheduler()
            .expect("the demo model's scheduler"),
        karras: false,
        rng: RngKind::Torch,
        size_conditioning: Default::default(),
        preview_every: None,
        text: Default::default(),
        image: None,
    };
    let embeddings: Vec<PromptEmbeddings> = cases
        .iter()
        .map(|c| {
            model
                .encode_prompt(c.0, "", sampling.guidance, &mut |_| {})
                .expect("encode")
        })
        .collect();
    let embeddings = PromptEmbeddings::stack(&embeddings).expect("stack");
    let seeds: Vec<u64> = (0..cases.len() as u64).map(|i| first_seed + i).collect();
    let images = model
        .render_batch(
            &embeddings,
            &seeds,
            None,
            &sampling,
            0,
            &mut Timings::default(),
            &latent::Cancel::new(),
            &mut |_| {},
        )
        .expect("render");
    let mut score = Score {
        total: cases.len(),
        ..Score::default()
    };
    for (case, image) in cases.iter().zip(&images) {
        let seen = measure(&image.rgb, image.width, image.height);
        let failed = failures(case, &seen);
        score.all += usize::from(failed.is_empty());
        score.colors += usize::from(
            !failed
                .iter()
                .any(|f| matches!(*f, "background" | "color" | "no shape")),
        );
        score.shape += usize::from(!failed.iter().any(|f| matches!(*f, "shape" | "no shape")));
        let verdict = if failed.is_empty() {
            "ok".to_string()
        } else {
            format!("MISS ({})", failed.join(", "))
        };
        let what = match &seen.shape {
            Some(s) => format!(
                "{} {} {} {} on {} (extent {:.2}, top {:.2}, square fit {:.2}, circle fit {:.2})",
                s.size,
                s.color,
                s.class,
                s.position,
                seen.background,
                s.extent,
                s.top,
                s.square_fit,
                s.circle_fit
            ),
            None => format!("no shape on {}", seen.background),
        };
        println!(
            "{label} seed {}: {:?} -> {what}: {verdict}",
            image.seed, case.0
        );
    }
    let pct = |n: usize| 100.0 * n as f64 / score.total as f64;
    println!(
        "{label}: {}/{} fully correct ({:.0}%), colours {}/{} ({:.0}%), shape class {}/{} ({:.0}%)",
        score.all,
        score.total,
        pct(score.all),
        score.colors,
        score.total,
        pct(score.colors),
        score.shape,
        score.total,
        pct(score.shape)
    );
    score
}

#[test]
fn demo_model_draws_what_the_prompt_says() {
    let (_cache, model) = load_demo();
    assert_eq!(
        model.default_size(),
        64,
        "the demo model draws 64x64 images"
    );
    let trained = score(&model, "trained", TRAINED, EVAL_SEED);
    let held_out = score(
        &model,
        "held-out",
        HELD_OUT,
        EVAL_SEED + TRAINED.len() as u64,
    );
    println!("demo model: trained combinations {trained:?}, held-out combinations {held_out:?}");
    // At least 90% of the trained combinations come out entirely right (the shipped model:
    // 94% over 4 seeds per prompt in diffusers, weights/README.md); the held-out combinations
    // are reported only.
    let need = (REQUIRED * trained.total as f64).ceil() as usize;
    assert!(
        trained.all >= need,
        "everything right in only {}/{} trained prompts, need {need}",
        trained.all,
        trained.total
    );
}
